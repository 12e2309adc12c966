"""Results by group of images (image source, view, finding): a shortcut check in every evaluation.

A model that detects the disease works about equally well in every source; one that learned the
sources calls every image of a negative-only source COVID, or separates the classes only where they
come from different sources. For each attribute with two or more values this reports, per value, the
images and patients of each class, the share called COVID, sensitivity, specificity and, where both
classes are present, the ROC-AUC: each with its 95 % interval (`metrics.evaluate_predictions`).

The **source-matched subset** is the images of the sources present in both classes, or of the
sources named by `--matched_sources` (e.g. ieee8023's teaching sites, radiopaedia and eurorad, where
both classes came through the same upload route): the comparison least explained by the site.

metrics.json gets {"subgroups": {"threshold": t, ATTRIBUTE: {VALUE: GROUP}, "source_matched":
{"sources": [...], **GROUP}}}, GROUP = {"counts", "confusion_matrix", "called_covid", "metrics":
{accuracy, sensitivity, specificity, roc_auc}} with the records of `metrics.evaluate_predictions`.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from covid_flax import errors, metrics, report

_KEPT = ("accuracy", "sensitivity", "specificity", "roc_auc")


def _group(labels, probs, patient_ids, mask, threshold, n_resamples) -> dict[str, Any]:
  record = metrics.evaluate_predictions(
    labels[mask], probs[mask], patient_ids[mask], threshold, n_resamples=n_resamples
  )
  cm = record["confusion_matrix"]
  called = cm["tp"] + cm["fp"]
  n = record["counts"]["n_images"]
  low, high = metrics.wilson_interval(called, n)
  return {
    "counts": record["counts"],
    "confusion_matrix": cm,
    "called_covid": {"value": called / n, "ci_low": low, "ci_high": high, "ci_method": "wilson"},
    "metrics": {k: record["metrics"][k] for k in _KEPT},
  }


class SubgroupError(errors.UserError, ValueError):
  pass


def check_matched_sources(matched: Sequence[str], attributes: Mapping[str, Any]) -> None:
  """Raises if `matched` names a source that the images do not have."""
  if not matched:
    return
  if "source" not in attributes:
    raise SubgroupError(
      f"--matched_sources={','.join(matched)}: these images have no source to match"
    )
  known = set(np.asarray(attributes["source"], dtype=str).tolist())
  unknown = sorted(set(matched) - known)
  if unknown:
    raise SubgroupError(f"--matched_sources: {unknown} not among the sources {sorted(known)}")


def matched_sources(labels: np.ndarray, sources: np.ndarray) -> list[str]:
  """The sources that have images of both classes."""
  return sorted(set(sources[labels == 1].tolist()) & set(sources[labels == 0].tolist()))


def subgroup_results(
  labels: Any,
  probs: Any,
  patient_ids: Any,
  attributes: Mapping[str, Any],
  threshold: float,
  n_resamples: int = 1000,
  matched: Sequence[str] = (),
) -> dict[str, Any]:
  """The "subgroups" entry of metrics.json (module docstring); {} when no attribute has two or
  more values. `matched`: the sources of the source-matched subset (default: every source with
  images of both classes); naming a source the data does not have is an error."""
  check_matched_sources(matched, attributes)
  labels, probs = np.asarray(labels), np.asarray(probs)
  patient_ids = np.asarray(patient_ids)
  out: dict[str, Any] = {}
  for name, values in attributes.items():
    values = np.asarray(values, dtype=str)
    if len(np.unique(values)) < 2:
      continue
    out[name] = {
      v: _group(labels, probs, patient_ids, values == v, threshold, n_resamples)
      for v in sorted(np.unique(values).tolist())
    }
  if "source" in out:
    sources = np.asarray(attributes["source"], dtype=str)
    matched = sorted(matched) or matched_sources(labels, sources)
    if matched:
      mask = np.isin(sources, matched)
      group = _group(labels, probs, patient_ids, mask, threshold, n_resamples)
      out["source_matched"] = {"sources": matched, **group}
  if out:
    out = {"threshold": float(threshold), **out}
  return out


def _cell(rec: Mapping[str, Any]) -> str:
  return report.format_value(rec, 2)


def _row(label: str, group: Mapping[str, Any]) -> str:
  c, m = group["counts"], group["metrics"]
  return (
    f"| {label} | {c['n_positive']} / {c['n_negative']} | {c['n_patients']} | "
    f"{_cell(group['called_covid'])} | {_cell(m['sensitivity'])} | {_cell(m['specificity'])} | "
    f"{_cell(m['roc_auc'])} |"
  )


def markdown(subgroups: Mapping[str, Any]) -> str:
  """Markdown tables of a "subgroups" entry ('' when it is empty)."""
  if not subgroups:
    return ""
  head = [
    "| group | images COVID / non-COVID | patients | called COVID | sensitivity | specificity | "
    "ROC-AUC |",
    "|---|---|---|---|---|---|---|",
  ]
  lines = [f"## By group, at threshold {subgroups['threshold']:.4g}", ""]
  matched = subgroups.get("source_matched")
  if matched:
    lines += [
      f"**Source-matched subset** ({', '.join(matched['sources'])}):",
      "",
      *head,
      _row("source-matched", matched),
      "",
    ]
  for name, groups in subgroups.items():
    if name in ("threshold", "source_matched"):
      continue
    lines += [f"By {name}:", "", *head, *(_row(v, g) for v, g in groups.items()), ""]
  lines.append(
    "95 % intervals: 'called COVID' Wilson over images; the rest as in the table above. A ROC-AUC "
    "needs both classes in the group."
  )
  return "\n".join(lines) + "\n"
