"""Training: everything that can fail before the process group (:mod:`.run`), the engine loop (:mod:`.loop`),
evaluation, the LR schedule, metrics, the pre-run report and the embedded demo's assets."""
