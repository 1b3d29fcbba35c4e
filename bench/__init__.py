"""Throughput and latency benchmark of ses-relay against a do-nothing SMTP
server and Postfix.

``python -m bench`` (from the repository root) runs each scenario with the
same load against each target in turn: a do-nothing aiosmtpd server (the
ceiling), the real relay (``python -m relay serve``) delivering to a fast
fake SES over HTTPS, and Postfix relaying to ``smtp-sink`` when installed;
the round ``--repeat`` times (3), each target's figures the medians of its
runs.
Every part runs in its own process:

* ``bench/fakeses.py``   the fake SES (aiohttp, TLS with a throwaway CA);
* ``bench/ceiling.py``   the do-nothing SMTP server;
* ``bench/postfix.py``   the private Postfix instance and its smtp-sink;
* ``bench/smtpsource.py`` the load from Postfix's ``smtp-source``, with a
  latency probe beside it;
* ``bench/load.py``      the fallback load generator (asyncio + aiosmtplib),
  also the probe;
* ``bench/fsyncs.py``    fsyncs counted with ``perf stat``;
* ``bench/services.py``  how the driver starts each target, talks to it and
  stops it;
* ``bench/procs.py``     child processes: start, wait for a log line, stop;
  CPU time and peak RSS of a process tree from ``/proc``;
* ``bench/scenarios.py`` what one scenario runs and measures;
* ``bench/repeat.py``    runs interleaved, and their figures folded into medians;
* ``bench/report.py``    the tables and the JSON;
* ``bench/__main__.py``  the command line.
"""
