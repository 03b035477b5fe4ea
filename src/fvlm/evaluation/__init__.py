"""Zero-shot evaluation: prompts and scoring, metrics, reports, plots, CT-RATE/Rad-ChestCT readers.

Plain PyTorch/pandas (no Lightning). The evaluation application is built on these:
:mod:`~fvlm.evaluation.embedding` (a checkpoint's study embeddings from crops of its training
size, planned by :mod:`~fvlm.evaluation.crop_plan`; :mod:`~fvlm.evaluation.evaluability` says
which studies each disease is scored on),
:mod:`~fvlm.evaluation.run` (score and write outputs) and :mod:`~fvlm.evaluation.commands`
(``fvlm evaluate``/``eval-ctrate``/``eval-radchestct``); they are imported on use, not here.
"""

from fvlm.evaluation.crop_plan import CropPlan, plan_crops, tile_crops
from fvlm.evaluation.ctrate import (
    CTRATE_LABELS,
    ctrate_label_map,
    ctrate_manifest,
    ctrate_volume_path,
    parse_xy_spacing,
)
from fvlm.evaluation.evaluability import (
    ABSENT_RULES,
    AbsentRule,
    AnatomyStatus,
    Evaluability,
    anatomy_status,
)
from fvlm.evaluation.metrics import (
    METRIC_COLUMNS,
    THRESHOLD_METHODS,
    ThresholdMethod,
    binary_metrics,
    bootstrap_auroc,
    choose_threshold,
    column_definitions,
    evaluate_scores,
    roc_curve,
    threshold_column,
)
from fvlm.evaluation.plots import plot_auroc_comparison, plot_roc_curves
from fvlm.evaluation.radchestct import (
    RADCHESTCT_CALCIFICATION_MERGE,
    RADCHESTCT_TO_CTRATE,
    load_radchestct_volume,
    merge_max_scores,
    radchestct_affine,
    radchestct_manifest,
)
from fvlm.evaluation.report import (
    comparison_table,
    format_table,
    log_tensorboard,
    summary_dict,
    write_report,
)
from fvlm.evaluation.zero_shot import (
    PromptTemplates,
    build_prompts,
    whole_scan_embedding,
    zero_shot_scores,
)

__all__ = [
    "ABSENT_RULES",
    "CTRATE_LABELS",
    "METRIC_COLUMNS",
    "RADCHESTCT_CALCIFICATION_MERGE",
    "RADCHESTCT_TO_CTRATE",
    "THRESHOLD_METHODS",
    "AbsentRule",
    "AnatomyStatus",
    "CropPlan",
    "Evaluability",
    "PromptTemplates",
    "ThresholdMethod",
    "anatomy_status",
    "binary_metrics",
    "bootstrap_auroc",
    "build_prompts",
    "choose_threshold",
    "column_definitions",
    "comparison_table",
    "ctrate_label_map",
    "ctrate_manifest",
    "ctrate_volume_path",
    "evaluate_scores",
    "format_table",
    "load_radchestct_volume",
    "log_tensorboard",
    "merge_max_scores",
    "parse_xy_spacing",
    "plan_crops",
    "plot_auroc_comparison",
    "plot_roc_curves",
    "radchestct_affine",
    "radchestct_manifest",
    "roc_curve",
    "summary_dict",
    "threshold_column",
    "tile_crops",
    "whole_scan_embedding",
    "write_report",
    "zero_shot_scores",
]
