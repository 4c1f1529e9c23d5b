"""The paper's published averages (Dai et al. 2022, the averages over its six tasks; PAPER below is where they are
written down, docs/paper-map.md says where each formula lives) and how a report
writes ours beside them: for the 1.3B and 2.7B models, the row's label, our figure (a str.format over metric
registry names, each the mean over tasks of the mean over seeds) and why ours can be undefined."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperRow:
    paper: tuple[str, str]  # the 1.3B and 2.7B averages
    label: str
    ours: str
    undefined: str = ""


PAPER = {
    "rec2ftp": PaperRow(("85.56%", "89.39%"), "Rec2FTP", "{rec2ftp:.2%}", "FT fixed no ZSL error on some task"),
    "simaou": PaperRow(("0.186 (random ≈ 0)", "0.225"), "SimAOU", "{simaou:.3f} (random {simaou_random_uniform:.3f})"),
    "simam_ft": PaperRow(("0.442 vs 0.338", "0.434 vs 0.355"), "SimAM (after FT) vs ZSL SimAM",
                         "{simam_ft:.3f} vs {simam_zsl:.3f}"),
    "kendall_token": PaperRow(("0.193 (random ≈ 0)", "0.214"), "Kendall",
                              "{kendall_token:.3f} (random {kendall_random:.3f})"),
}
