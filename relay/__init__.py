"""ses-relay: an SMTP-to-Amazon-SES relay daemon."""

__version__ = "0.1.0.dev0"
