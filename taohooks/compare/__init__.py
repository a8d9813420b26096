"""``taocache compare``: the paper's evaluation through the user's own sample script (issue 14).

- :mod:`.experiment`: the experiment YAML and prompt lists;
- :mod:`.targets`: what compare needs of each integration's generation function;
- :mod:`.store`: the resumable run store;
- :mod:`.runner`: the experiment, run on the script's first generation call;
- :mod:`.scoring`: metrics of one generation against its reference;
- :mod:`.report`: ``results.json`` and ``results.md``;
- :mod:`.plots`: quality vs speedup, the skip schedule, the side-by-side strip;
- :mod:`.command`: the command (launcher, then report).
"""
from .experiment import ExperimentConfig, PromptEntry, load_experiment
from .report import load_results, markdown_table

__all__ = ["ExperimentConfig", "PromptEntry", "load_experiment", "load_results", "markdown_table"]
