"""Launchers for Flower runs of this project, one concept per module.

- :mod:`runner.simulation`: a run in Flower's simulation engine on a private, throw-away SuperLink.
- :mod:`runner.deployment`: a SuperLink and SuperNodes as local processes (TLS, SuperNode auth).
- :mod:`runner.inprocess`: the same ServerApp and ClientApp in one process, without Ray.
- :mod:`runner.common`: what the launchers do alike around Flower's processes and CLI.
- :mod:`runner.runconfig`: run configs: TOML, ``--run-config`` parsing, checks before anything starts.
- :mod:`runner.results`: the results file a run wrote, and whether the run completed.
- :mod:`runner.processes`: finding and stopping exactly the processes a launcher started.
"""
