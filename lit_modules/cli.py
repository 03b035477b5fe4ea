"""LightningCLI for fvlm: ``fvlm fit --config configs/fvlm.yaml`` (also ``lightning fit ...``).

Values the model needs from the data (the number of anatomies, the text model the tokenizer
belongs to) are linked from the data module, so a YAML file states them once.
"""

from __future__ import annotations

import warnings

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from fvlm.data_modules import CTReportDataModule

__all__ = ["FVLMCLI", "run_cli"]

# The modules finish crops on the device in ``on_after_batch_transfer`` by design (the data module
# has no hook of its own); Lightning warns about that on every run with a data module.
warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`"
)


class FVLMCLI(LightningCLI):
    """LightningCLI with the data -> model links of fvlm."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - jsonargparse parser
        """Link anatomy count and text model from the data module into the model."""
        parser.link_arguments(
            "data.num_anatomies", "model.init_args.num_anatomies", apply_on="instantiate"
        )
        parser.link_arguments("data.tokenizer", "model.init_args.text_model")
        parser.link_arguments(
            "data.crop_size", "model.init_args.vision.img_size", apply_on="instantiate"
        )
        parser.link_arguments(
            "data.hu_window", "model.init_args.vision.source_hu_window", apply_on="instantiate"
        )


def run_cli(args: list[str] | None = None, run: bool = True) -> FVLMCLI:
    """Build (and by default run) the CLI; tests call ``run_cli([...])`` directly."""
    return FVLMCLI(
        model_class=LightningModule,
        datamodule_class=CTReportDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
