"""Markdown report of a metrics.json dict (`metrics.evaluate_at_thresholds`): metrics with their
confidence intervals per threshold, and the confusion counts."""

from typing import Any, Mapping

from covid_flax.metrics import METRIC_LABELS, METRICS, threshold_records


def format_value(rec: Mapping[str, Any], digits: int = 3) -> str:
  """'0.912 [0.871, 0.945]' from a metric record; 'n/a' for undefined values."""
  if rec.get("value") is None:
    return "n/a"
  text = f"{rec['value']:.{digits}f}"
  if rec.get("ci_low") is not None and rec.get("ci_high") is not None:
    text += f" [{rec['ci_low']:.{digits}f}, {rec['ci_high']:.{digits}f}]"
  return text


_CONFUSION_ROWS = (
  ("tp", "COVID called COVID (TP)"),
  ("fn", "COVID missed (FN)"),
  ("tn", "non-COVID called non-COVID (TN)"),
  ("fp", "non-COVID called COVID (FP)"),
)


def markdown_report(results: Mapping[str, Any], title: str = "Evaluation") -> str:
  """Markdown of a metrics.json dict (or one RECORD): metrics with CIs per threshold, counts."""
  records = list(({"": results} if "metrics" in results else threshold_records(results)).items())
  if not records:
    raise ValueError("no RECORD found (expected 'threshold_*' keys or a 'metrics' key)")
  first = records[0][1]
  c, b = first["counts"], first["bootstrap"]
  summary = (
    f"{c['n_images']} images ({c['n_positive']} COVID, {c['n_negative']} non-COVID) "
    f"from {c['n_patients']} patients."
  )
  if results.get("target_sensitivity") is not None:
    summary += (
      f" Val threshold: the highest with val sensitivity >= {results['target_sensitivity']}."
    )
  heads = [f"threshold {r['threshold']:.4g}{' (val)' * (k == 'threshold_val')}" for k, r in records]
  lines = [f"# {title}", "", summary, "", f"| Metric | {' | '.join(heads)} |"]
  lines.append("|---" * (len(heads) + 1) + "|")
  rows = [(METRIC_LABELS[n], [format_value(r["metrics"][n]) for _, r in records]) for n in METRICS]
  rows += [
    (f"Count: {t}", [str(r["confusion_matrix"][c]) for _, r in records]) for c, t in _CONFUSION_ROWS
  ]
  lines += [f"| {name} | {' | '.join(cells)} |" for name, cells in rows]
  methods = {m["ci_method"] for _, r in records for m in r["metrics"].values()}
  lines.append(
    f"\nIn brackets: {round(100 * first['confidence'])} % confidence intervals "
    f"({', '.join(sorted(methods))}); the patient bootstrap draws {b['n_resamples']} resamples "
    f"of patients (seed {b['seed']}) with all their images."
  )
  # A note every column shares is said once; the others say which column (threshold) they are of.
  shared = set.intersection(*(set(r.get("notes", [])) for _, r in records))
  notes = sorted(shared) + [
    f"{head}: {n}" for head, (_, r) in zip(heads, records) for n in r.get("notes", [])
    if n not in shared
  ]  # fmt: skip
  return "\n".join(lines + (["", "Notes:", ""] + [f"- {n}" for n in notes] if notes else [])) + "\n"
