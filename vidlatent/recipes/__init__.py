"""Training recipes as data (``vidlatent/configs/recipes/<name>/``) and the runner of their stages.

``recipe``: loading a recipe's yaml into runs whose ``TrainConfig`` each builds; ``runner``: running a stage
(``vidlatent train`` processes, latent caches, lanes at once) and assembling the shipped folder.
"""

from .recipe import RECIPE_DIR, Cache, Recipe, Run, Stage, dotlist_value, load_recipe, load_stage
from .runner import adopt_ship, assemble, pipeline_settings, run_stage, ship, shipped_runs

__all__ = [
    "RECIPE_DIR",
    "Cache",
    "Recipe",
    "Run",
    "Stage",
    "dotlist_value",
    "load_recipe",
    "load_stage",
    "adopt_ship",
    "assemble",
    "pipeline_settings",
    "run_stage",
    "ship",
    "shipped_runs",
]
