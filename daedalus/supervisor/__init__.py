"""``daedalus run``: the supervisor that starts ingest and the ETL watcher as child
processes, keeps them alive for months and reports on them.

- :mod:`.children`: what to run (specs) and the restart policy, pure functions over times.
- :mod:`.process`: one child process (spawn, output pump, graceful stop, RSS).
- :mod:`.logfiles`: each child's output into ``<log_dir>/<child>.log`` with size rotation.
- :mod:`.systemd`: ``Type=notify`` datagrams (READY, WATCHDOG, STOPPING).
- :mod:`.main`: the asyncio loop tying them together; :mod:`.report`: ``daedalus status``.
"""
