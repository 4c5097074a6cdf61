"""The Flower adapter that the coordinator and the sites share (installed as ``umeml.flower``).

``umeml.server`` (the coordinator) and ``umeml.client`` (a hospital site) both talk to Flower;
what both need lives here, so that neither side imports the other:

- :mod:`umeml.flower.records`: model weights as Flower ArrayRecords and back;
- :mod:`umeml.flower.processes`: the environment Flower's processes run in, free ports, waiting
  for a port, stopping a process group;
- :mod:`umeml.flower.network`: ``HOST:PORT`` parsing, the address a bind address is dialed at,
  and the TLS probe of a SuperLink;
- :mod:`umeml.flower.supernode`: a SuperNode's command line and what its refusals mean;
- :mod:`umeml.flower.supernode_main`: Flower's ``flower-supernode`` with its polling tuned and a
  SuperLink's HTTP 500 retried;
- :mod:`umeml.flower.superexec_main`: Flower's ``flower-superexec`` (the SuperLink's, starting
  ServerApps) and ``flwr-serverapp`` with a SuperLink's HTTP 500 retried;
- :mod:`umeml.flower.clientapp_main`: Flower's ``flwr-clientapp`` with the short object-pull
  backoff (the resident site runtime's fallback);
- :mod:`umeml.flower.watchdog`: stops a run's Flower processes once its coordinator is gone.

This package imports ``flwr`` and umeml's core, never ``umeml.server`` or ``umeml.client``
(``tests/test_layering.py`` checks it). Wiring both sides together (the simulation) is
:mod:`umeml.simulation`'s job.
"""
