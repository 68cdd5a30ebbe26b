"""Example tasks to copy: an image classifier and a sensor-window classifier.

Each module is a task (``task: fedpipe_examples.images:task``) and can write simulated
site folders (``python -m fedpipe_examples.make_sites CONFIG``). Put ``examples/tasks`` on
``PYTHONPATH`` (or ``pip install`` a package of your own built the same way) at the
coordinator and at every site.
"""
