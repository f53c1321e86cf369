"""Run configuration: frozen dataclasses per concern, loadable from TOML with CLI overrides."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from training.data import DataConfig, dataset_stem
from training.loop import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class RunConfig:
    """One supervised training run: data, architecture (+ its settings), optimisation, output."""

    model: str
    data: DataConfig = field(default_factory=DataConfig)
    model_settings: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str | None = None

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else self.default_out_dir(self.model)

    def default_out_dir(self, label: str) -> Path:
        """``runs/<dataset>-<label>-L<L>-H<H>``: ``label`` is the model, or a variant's name."""
        d = self.data
        return Path("runs") / f"{dataset_stem(d.dataset)}-{label}-L{d.lookback}-H{d.horizon}"


def _update(obj: Any, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(obj)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return replace(obj, **values)


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from exc


def default_config_path(model: str) -> Path:
    return CONFIG_DIR / f"{model}.toml"


def build_run_config(
    model: str,
    config_file: Path | None = None,
    data: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    model_settings: dict[str, Any] | None = None,
    out_dir: str | None = None,
) -> RunConfig:
    """Defaults <- the model's TOML in ``training/configs`` (or ``config_file``) <- overrides."""
    path = config_file or default_config_path(model)
    doc = load_toml(path) if path.exists() else {}
    if config_file is not None and not config_file.exists():
        raise FileNotFoundError(f"config file not found: {config_file}")
    cfg = RunConfig(model=model)
    data_cfg = _update(cfg.data, {**doc.get("data", {}), **(data or {})}, f"{path} [data]")
    train_cfg = _update(cfg.train, {**doc.get("train", {}), **(train or {})}, f"{path} [train]")
    settings = {**doc.get("model", {}), **(model_settings or {})}
    return RunConfig(model, data_cfg, settings, train_cfg, out_dir)
