"""The task interface: how a user's model, data, loss and metrics enter fedpipe.

See :mod:`fl_components.task.protocol` (the interface), :mod:`fl_components.task.builtin`
(fedpipe's own models as tasks) and :mod:`fl_components.task.loading` (finding a task,
identifying its code).
"""

from fl_components.task.protocol import BoundTask, SiteContext, TaskData, UserTask

__all__ = ["BoundTask", "SiteContext", "TaskData", "UserTask"]
