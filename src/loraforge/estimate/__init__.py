"""Memory estimator: will a training run fit on my GPUs? (``loraforge estimate``; also printed by ``train``).

    from loraforge.estimate import estimate_for_config
    est = estimate_for_config(cfg, gpu="T4")        # cfg: RunConfig from loraforge.config.load_config
    print("\\n".join(est.summary_lines())); est.fits; est.suggestions

Only shapes are read (built-in architectures, a local config.json, or a cached hub config), never weights.
"""

from .architectures import Architecture, builtin_names, resolve_architecture
from .gpus import GPU, DetectedGPU, detect_gpus, find_gpu, gpu_names
from .model import Breakdown, estimate_memory
from .result import Estimate, build_estimate, estimate_for_config
from .scenario import Scenario, scenario_from_config

__all__ = [
    "GPU", "Architecture", "Breakdown", "DetectedGPU", "Estimate", "Scenario", "build_estimate", "builtin_names",
    "detect_gpus", "estimate_for_config", "estimate_memory", "find_gpu", "gpu_names", "resolve_architecture",
    "scenario_from_config",
]
