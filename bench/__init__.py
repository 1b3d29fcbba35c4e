"""Throughput and latency benchmark of ses-relay against a do-nothing SMTP server.

``python -m bench`` (from the repository root) runs each scenario twice with
the same load: once against a do-nothing aiosmtpd server (the ceiling), once
against the real relay (``python -m relay serve``) delivering to a fast fake
SES over HTTPS. Every part runs in its own process:

* ``bench/fakeses.py``  the fake SES (aiohttp, TLS with a throwaway CA);
* ``bench/ceiling.py``  the do-nothing SMTP server;
* ``bench/load.py``     the load generator (asyncio + aiosmtplib);
* ``bench/services.py`` how the driver starts each of them (and the relay);
* ``bench/procs.py``    child processes: start, wait for a log line, stop,
  CPU time and peak RSS from ``/proc``;
* ``bench/scenarios.py`` what one scenario runs and measures;
* ``bench/report.py``   the table and the JSON;
* ``bench/__main__.py`` the command line.
"""
