"""The outbound half: a SigV4-signing Amazon SES client over aiohttp."""
