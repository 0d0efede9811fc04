"""tailored: structured pruning of LLaMA-family models, recovered with LoRA and task-specific prompts.

One module per stage of the study (see DESIGN.md): ``models`` and ``data`` load things, ``graph`` traces
the coupled parameter groups, ``importance`` scores them, ``prune`` removes them, ``checkpoint`` saves
and reloads the result, ``lora`` recovers it, ``evaluate`` measures it, ``figures`` draws it.
"""

__version__ = "0.1.0"
