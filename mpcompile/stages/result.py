"""What a compile returns: :class:`CompileResult`, built from the final :class:`CompileState`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpcompile.analyze import Analysis
from mpcompile.checks.validate import OutputComparison
from mpcompile.numerics.spectrum_change import spectrum_change
from mpcompile.passes.sparsify_24 import LayerMask
from mpcompile.selection.orders import Selection
from mpcompile.stages.state import CompileState, PermutationRecord

__all__ = ["CompileResult", "result_of"]


@dataclass
class CompileResult:
    input_path: Path
    output_path: Path
    analysis: Analysis
    selection: Selection
    method: str
    calibration_source: str
    masks: list[LayerMask]
    permutations: list[PermutationRecord]
    check_ok: bool
    check: Any
    validation: OutputComparison | None
    eval_source: str | None
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    speedup: list[dict[str, Any]] = field(default_factory=list)
    output_files: list[Any] = field(default_factory=list)
    """:class:`~mpcompile.io.outputs.FileRecord` of every file the output model consists of."""
    committed: bool = True
    """False when the check failed: then nothing was written under the output's final name."""
    calibration_protocol: str | None = None
    """sequential / dense (how the statistics were taken); None: the method used no data."""
    capture_passes: int = 0
    """ONNX Runtime passes spent capturing layer statistics."""
    _spectra: dict[str, dict[str, float | int]] | None = field(default=None, repr=False)

    def spectra(self) -> dict[str, dict[str, float | int]]:
        """Spectrum preservation per masked layer (computed once, shared by report and table)."""
        if self._spectra is None:
            self._spectra = {m.layer: spectrum_change(m.dense, m.sparse) for m in self.masks}
        return self._spectra

    def to_dict(self) -> dict[str, Any]:
        from mpcompile.report.json_report import report_header

        masks = {m.layer: m for m in self.masks}
        spectra = self.spectra()
        layers = []
        for decision, analysis in zip(self.selection.decisions, self.analysis.result.layers):
            record = analysis.to_dict()
            record["sparse"] = decision.sparse
            record["decision"] = decision.reason
            mask = masks.get(decision.name)
            if mask is None and decision.sparse:  # a weight shared by several layers is masked once
                mask = next((masks[n] for n in analysis.layer.shared_with if n in masks), None)
            if mask is not None:
                record["method"] = mask.method
                record["calibrated"] = mask.calibrated
                record["kept_magnitude_fraction"] = mask.kept_magnitude_fraction
                record["spectrum"] = spectra[mask.layer]
            layers.append(record)
        return report_header(
            "compile",
            self.input_path,
            output={"path": str(self.output_path), "files": [f.to_dict() for f in self.output_files]},
            shapes=self.analysis.shape_spec.describe(),
            method=self.method,
            calibration=self.calibration_source,
            calibration_protocol={"protocol": self.calibration_protocol, "capture_passes": self.capture_passes},
            evaluation=self.eval_source,
            selection={
                "order": self.selection.order,
                "target": self.selection.target,
                **self.selection.macs_report(),
                "sparse_layers": len(self.selection.selected_names),
                **({"choice": self.selection.choice} if self.selection.choice is not None else {}),
            },
            check={"ok": self.check_ok, **(self.check.to_dict() if self.check is not None else {})},
            validation=self.validation.to_dict() if self.validation else None,
            permutations=[vars(p) for p in self.permutations],
            speedup=self.speedup,
            seconds=self.seconds,
            notes=self.notes,
            summary=self.analysis.result.summary(),
            layers=layers,
        )


def result_of(state: CompileState) -> CompileResult:
    """The result the caller sees, once every stage ran."""
    check = state.check
    if not check.ok:
        state.notes.append(f"the independent 2:4 check failed: nothing was written to {state.out_path}")
    return CompileResult(
        input_path=state.loaded.path,
        output_path=state.out_path,
        output_files=state.output_files,
        committed=check.ok,
        analysis=state.analysis,
        selection=state.selection,
        method=state.method,
        calibration_source=state.data.source,
        calibration_protocol=state.calibration_protocol,
        capture_passes=state.capture_passes,
        masks=state.masks,
        permutations=state.permutations,
        check_ok=check.ok,
        check=check,
        validation=state.validation,
        eval_source=state.eval_source,
        seconds={k: round(v, 3) for k, v in state.timings.items()},
        notes=state.notes,
        speedup=state.speedup,
        _spectra=state.spectra,
    )
