"""Async jobs that hold concurrency slots (SPEC §3 `routes[].job`).

- `tee`: reads a 2xx JSON answer while it streams to the client, bounded, never buffering
  before forwarding;
- `table`: which requests start a job or report one (status GET / DELETE), per config;
- `tracker`: the forwarder observers that hand a request's slot over to its job and end
  jobs, and the job store each admission store needs.
"""
