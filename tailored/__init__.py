"""tailored: structured pruning of LLaMA-family models, recovered with LoRA and task-specific prompts.

One module per stage of the study, imports pointing down only. At the bottom, leaves: ``paths``, ``anatomy``
(where the decoder blocks are; ``preserved``), ``choices`` (the names parameters choose among), ``tokens``.
Then ``models`` and ``data`` load things; ``graph`` traces the coupled parameter groups, ``importance``
scores them, ``removal`` cuts a plan out of a model, ``prune`` chooses the plan (and compensates),
``methods`` and ``recipes`` name and run whole pruning methods, ``checkpoint`` saves and reloads the result;
``recovery_data``, ``adapters``, ``snapshots`` and ``lora`` recover it; ``evaluate`` measures it,
``analysis`` decides the claims, ``figures`` draws it. ``rundir`` owns the run directory, ``params`` checks
every notebook's parameters, and ``runner`` and ``cli`` sit on top.
"""

__version__ = "0.1.0"
