"""The ``fedmq`` command line: the top layer, which names every role's command module by path."""
