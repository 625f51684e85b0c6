"""fedq's composition root: the ``fedq`` command, the local federation runner, the broker finder and
site provisioning.

It sits above ``coordinator/`` and ``worker/`` and puts them together; neither of them, nor
``shared/``, imports anything from here.
"""
