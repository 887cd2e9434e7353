"""The one extension point for steps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.errors import ConfigError, fail

if TYPE_CHECKING:
    from pipeline.settings.config import PipelineConfig
    from steps.context import StepContext


class Step:
    """A pipeline step: a config dataclass and ``run(ctx, cfg)``.

    A step reads its inputs as local files from ``ctx.inputs`` and writes every output under
    ``ctx.workdir``; the runner logs that folder as the run's artifacts and hands the paths a step
    puts in ``ctx.outputs`` to later steps.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    needs_steps: ClassVar[tuple[str, ...]] = ()  # direct needs; each present step checks its own
    needs_data: ClassVar[tuple[str, ...]] = ()
    parent_metrics: ClassVar[tuple[str, ...]] = ()  # fnmatch patterns copied onto the parent run
    reusable: ClassVar[bool] = True
    # the data source whose digest the cache key holds, logged as the run's MLflow dataset, and the
    # metric that counts the samples the step read from it
    dataset: ClassVar[str | None] = None
    dataset_samples: ClassVar[str] = ""
    next_artifact: ClassVar[str | None] = None  # what a user opens next (printed after ``int8pipe run``)

    @classmethod
    def label(cls, cfg: Any) -> str | None:
        """This step's part of the pipeline run's name, e.g. the method in ``digits (mse, tensorrt)``."""
        return None

    @classmethod
    def run_tags(cls, cfg: Any, pipeline: PipelineConfig) -> dict[str, str]:
        """Tags of the pipeline run that the runs table filters and groups by."""
        return {}

    @classmethod
    def summary_line(cls, cfg: Any) -> str | None:
        """This step's sentence in the pipeline run's description (the run page's note)."""
        return None

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        """Cross-section checks, run at config time so nothing starts on a config that cannot finish."""
        for dep in cls.needs_steps:
            require_step(cls.name, dep, pipeline)
        for which in cls.needs_data:
            if getattr(pipeline.data, which) is None:
                fail(ConfigError, f"steps.{cls.name} needs data.{which}: add a data.{which} source.")

    def can_reuse(self, ctx: StepContext, cfg: Any) -> bool:
        """Whether a finished run with the same cache key may stand in for this one: only when the
        key captures everything the result depends on."""
        return self.reusable

    def cache_config(self, cfg: Any) -> Any:
        """The part of the config that decides the result (default: all of it)."""
        return cfg

    def fallback_configs(self, cfg: Any) -> list[Any]:
        """Other cache configs whose finished runs this step can also stand on (see ``on_reuse``)."""
        return []

    def on_reuse(self, ctx: StepContext, cfg: Any) -> None:
        """Adapt a reused run's restored outputs to ``cfg`` (e.g. another method on the same measurements)."""

    def reuse_note(self, ctx: StepContext, cfg: Any) -> str:
        """Why the restored outputs (in ``ctx.outputs``) stand for this config, for the log line."""
        return "same config and inputs"

    def key_material(self, ctx: StepContext, cfg: Any) -> dict[str, Any]:
        """Anything beyond the step config and input files that changes this step's result."""
        return {}

    def run(self, ctx: StepContext, cfg: Any) -> None:
        raise NotImplementedError


def require_step(step: str, dep: str, pipeline: PipelineConfig) -> None:
    """Fail at config time when ``step`` needs ``dep`` and the YAML has no ``steps.<dep>``."""
    if dep not in pipeline.steps:
        fail(ConfigError, f"steps.{step} needs steps.{dep}: add a steps.{dep} section (it may be empty).")
