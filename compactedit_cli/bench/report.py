"""How a benchmark report is shown: a Rich table per report, and why a requested speed option did not apply.

Presentation only; :mod:`.run` and :mod:`.startup` measure. Reads nothing but the JSON-ready report dicts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

_MEMORY_KINDS = (
    ("peak_allocated_bytes", "peak allocated"),
    ("peak_rss_bytes", "peak RSS"),
    ("driver_allocated_bytes", "driver allocated"),
)


def unapplied_options(report: dict[str, Any]) -> list[str]:
    """Why a requested speed option did not apply (no compiler, no CUDA, a failed capture), one message each."""
    used = report["settings"]
    messages = []
    if used["compile"] not in (False, "off") and not used["compiled"]:
        messages.append(used["compile_message"])
    if used["cuda_graphs"] and not used["cuda_graphs_active"]:
        messages.append(used["cuda_graphs_message"])
    if used.get("kernels") == "triton" and not used.get("kernels_active"):
        messages.append(used["kernels_message"])
    return messages


def _memory_cell(memory: dict[str, Any]) -> tuple[str, str]:
    """(GiB, what was measured) of a row's memory record."""
    for key, label in _MEMORY_KINDS:
        if key in memory:
            return f"{memory[key] / 2**30:.2f}", label
    return "n/a", "memory"


def report_table(report: dict[str, Any]) -> Table:
    """A Rich table of a report: one row per resolution, median seconds per stage (min and max are in the JSON).

    "busy" is the share of the host's CPU that other processes used during the runs (CPU timings are only
    trustworthy when it is near 0).
    """
    from rich.table import Table

    s = report["settings"]
    title = (
        f"{report['model']['source']}\n{report['device']['name']} ({s['device']}, {s['dtype']}), {s['steps']} steps, "
        f"{s['guidance_branches']} branch(es), batch {s['batch']}, offload {s['offload']}, "
        f"compile {'on' if s['compiled'] else 'off'}, CUDA graphs {'on' if s['cuda_graphs_active'] else 'off'}, "
        f"kernels {'triton' if s.get('kernels_active') else 'off'}, quantize {s.get('quantize', 'none')}"
    )
    memory_kind = _memory_cell(report["results"][0]["memory"])[1] if report["results"] else "memory"
    caption = (
        f"seconds (step: ms), median of {s['repeats']} timed runs after {s['warmup']} warm-up(s); "
        f"mem: {memory_kind} GiB"
    )
    table = Table(title=title, caption=caption, box=None, pad_edge=False)
    headers = ("size", "VLM", "VAE enc", "denoise", "step", "VAE dec", "total", "range", "mem", "busy")
    for header in headers:
        table.add_column(header, justify="left" if header == "size" else "right", no_wrap=True)
    for row in report["results"]:
        st = row["stages"]
        e2e = st["end_to_end"]
        table.add_row(
            f"{row['model_size']['width']}×{row['model_size']['height']}",
            *(f"{st[name]['median']:.2f}" for name in ("vlm_encode", "vae_encode", "denoise")),
            f"{st['denoise_step']['median'] * 1000:.1f}",
            f"{st['vae_decode']['median']:.2f}",
            f"{e2e['median']:.2f}",
            f"{e2e['min']:.2f}-{e2e['max']:.2f}",
            _memory_cell(row["memory"])[0],
            "n/a" if row["foreign_cpu_share"] is None else f"{row['foreign_cpu_share']:.0%}",
        )
    return table


def startup_table(report: dict[str, Any]) -> Table:
    """A Rich table of :func:`~.startup.startup_overhead`'s report: median and range of seconds per probe."""
    from rich.table import Table

    title = f"fresh {report['python']} processes on {report['device']['name']}"
    table = Table(title=title, caption=f"seconds, median of {report['repeats']} runs", box=None, pad_edge=False)
    for header in ("probe", "median", "range"):
        table.add_column(header, justify="left" if header == "probe" else "right", no_wrap=True)
    for name, stats in report["probes"].items():
        table.add_row(name, f"{stats['median']:.2f}", f"{stats['min']:.2f}-{stats['max']:.2f}")
    return table


def cold_table(report: dict[str, Any]) -> Table:
    """A Rich table of :func:`~.startup.cold_start`'s report: seconds per stage of a fresh edit process."""
    from rich.table import Table

    size = report["model_size"]
    title = f"fresh edit process: {report['model']} at {size['width']}×{size['height']} on {report['device']['name']}"
    caption = f"seconds, median of {report['repeats']} process(es); the process adds interpreter start and exit"
    table = Table(title=title, caption=caption, box=None, pad_edge=False)
    for header in ("stage", "seconds", "share"):
        table.add_column(header, justify="left" if header == "stage" else "right", no_wrap=True)
    total = report["total"]
    for name, seconds in report["stages"].items():
        table.add_row(name, f"{seconds:.2f}", f"{seconds / total:.0%}" if total else "n/a")
    table.add_row("total", f"{total:.2f}", "")
    table.add_row("process", f"{report['process']:.2f}", "")
    cache = report.get("compile_cache")
    if cache:
        hits, misses = cache["fxgraph_cache_hit"], cache["fxgraph_cache_miss"]
        table.add_row("compile cache", f"{hits} hit / {misses} miss", "")
    return table
