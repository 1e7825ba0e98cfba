"""Async jobs that hold concurrency slots (SPEC §3 `routes[].job`).

- `scan`: finds one dotted field of a JSON answer while it streams to the client, any size,
  bounded memory, never buffering before forwarding (a dotted path read as `tests/support/dotted.py` reads a parsed document);
- `body`: that scan in the answer's coding, and the `Accept-Encoding` a job request forwards
  (only codings the scan decodes);
- `table`: which requests start a job or report one (status GET / DELETE), per config;
- `tracker`: the forwarder observers that hand a request's slot over to its job and end
  jobs, and the job store each admission store needs.
"""
