"""The library-level edit: image files in, image files out. Every command calls this, and nothing else edits.

::

    from compactedit_cli import Editor

    editor = Editor(model="vibe")                      # resolves, verifies and loads, once
    [record] = editor.edit("street.jpg", "remove the car", "out.png", seed=7)
    print(record.output, record.seconds)

:class:`Editor` is built from :class:`~compactedit_cli.options.ModelOptions` (plain values, so it pickles and a
worker process can rebuild the Editor from it); :meth:`Editor.edit` writes one edit's outputs and returns one
:class:`~compactedit_cli.record.EditRecord` per file written; :meth:`Editor.edit_many` edits a stream of jobs,
grouping same-size ones for ``batch_size``, and reports each job's outcome without stopping at one bad job.

This module imports no torch itself: opening an Editor does, so callers check their inputs first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from PIL import Image

from . import options
from .errors import (
    CompactEditError,
    DiskFullError,
    OutOfMemoryError,
    OutputError,
    UsageError,
    internal_error,
    is_out_of_memory,
)
from .files import outputs
from .files.imaging import SourceImage, open_image
from .files.masks import Mask, open_mask
from .loading.refs import recorded_adapter
from .options import EditOptions, ModelOptions, OutputOptions
from .record import EditRecord

if TYPE_CHECKING:
    from .files.compositing import Retouch  # numpy: imported by an in-process edit only, not by a server's client


class Progress(Protocol):
    """What an edit reports while it runs (a progress bar, a server's event stream)."""

    def stage(self, name: str) -> None: ...

    def step(self, state: Any) -> None: ...


@dataclass
class Computed:
    """An edit's output pictures, each with its record, before anything is written."""

    pictures: list[Image.Image]
    records: list[EditRecord]


@dataclass
class EditJob:
    """One edit of :meth:`Editor.edit_many`: a source file, an instruction, an output file and its parameters."""

    source: Path
    instruction: str
    output: Path
    options: EditOptions = field(default_factory=EditOptions)
    exif: str | None = None  # this job's EXIF policy (a manifest's ``exif`` column); None: the run's
    mask: Path | None = None  # this job's mask file (a manifest's ``mask`` column)
    invert_mask: bool = False


@dataclass
class JobOutcome:
    """What became of one job: ``ok`` with its record, or ``failed`` with a one-line error.

    ``fatal`` marks an error every later job would meet too (a full disk): the caller should stop.
    """

    job: EditJob
    status: str
    record: EditRecord | None = None
    error: str | None = None
    seed: int | None = None
    fatal: CompactEditError | None = None


@dataclass
class Prepared:
    """A job with its image opened and its group key (model size and parameters): ready for the device."""

    job: EditJob
    image: SourceImage
    key: Any
    mask: Mask | None = None


@dataclass
class ComputedJob:
    """A job of :meth:`Editor.edit_many` edited but not yet written: its source (which the output's colour tag and
    EXIF come from), the picture and its record (already naming the output)."""

    job: EditJob
    image: SourceImage
    picture: Image.Image
    record: EditRecord


def describe_failure(exc: BaseException) -> str:
    """The one line recorded for an edit that raised ``exc``."""
    if is_out_of_memory(exc):
        return str(OutOfMemoryError())
    if isinstance(exc, CompactEditError):
        return str(exc)
    return internal_error(exc)


class Editor:
    """A loaded model that edits files into files. Open it once; call :meth:`edit` as often as you like."""

    def __init__(
        self,
        model: ModelOptions | str | None = None,
        *,
        status: Callable[[str], None] = lambda _message: None,
        **model_options: Any,
    ) -> None:
        """Resolve (downloading unless offline), verify and load the model. ``model`` is a
        :class:`ModelOptions` or a model name; keyword arguments are the other :class:`ModelOptions` fields.
        Requested speed options that cannot apply here are listed in :attr:`notes`.
        """
        if not isinstance(model, ModelOptions):
            model = ModelOptions(model=model or options.DEFAULT_MODEL, **model_options)
        elif model_options:
            raise UsageError("give either ModelOptions or keyword options, not both")
        self.options = model
        self.pipe, self.resolved, self.notes = _load(model, status)

    # ---- one edit ---------------------------------------------------------------------------------------------

    def edit(
        self,
        source: str | Path | bytes | IO[bytes] | SourceImage,
        instruction: str,
        output: str | Path | IO[bytes],
        *,
        edit_options: EditOptions | None = None,
        output_options: OutputOptions | None = None,
        source_name: str | None = None,
        progress: Progress | None = None,
        mask: str | Path | bytes | Mask | None = None,
        invert_mask: bool = False,
        **parameters: Any,
    ) -> list[EditRecord]:
        """Edit ``source`` and write the result to ``output``; one record per file written.

        ``source`` is a path, the bytes of an image file, a binary stream (stdin), or an already opened
        :class:`~compactedit_cli.files.imaging.SourceImage`. ``output`` is a path (``num_images`` > 1 writes
        ``out-1.png``, ``out-2.png``, …) or a binary stream (one image, in ``output_options.format``).
        ``parameters`` are :class:`EditOptions` fields (``steps``, ``guidance``, ``image_guidance``, ``seed``,
        ``num_images``, ``binning``, and the mask's ``mask_mode``, ``feather``, ``crop_to_mask``, ``color_match``),
        applied over ``edit_options``. ``mask`` (a file, its bytes, or an opened
        :class:`~compactedit_cli.files.masks.Mask`) limits the edit to its editable pixels; ``invert_mask`` swaps
        them when the mask is read here.
        """
        started = time.perf_counter()
        chosen = (edit_options or EditOptions()).replace(**parameters)
        out = output_options or OutputOptions()
        text = options.instruction(instruction)
        stream = not isinstance(output, (str, Path))
        paths = [] if stream else outputs.numbered(Path(output), chosen.num_images)
        if stream and chosen.num_images != 1:
            raise UsageError("a stream takes one image; write several to a file name")
        if stream and out.format is None:
            raise UsageError("writing to a stream needs an output format")
        for path in paths:
            options.output_format(path, out.format)
        inputs = [Path(source)] if isinstance(source, (str, Path)) else []
        image = source if isinstance(source, SourceImage) else open_image(source)
        first = paths[0] if paths else None  # the numbered outputs share one extension
        fmt = options.output_format(first, out.format)
        options.check_output_fits(fmt, image.size, "the output" if first is None else str(first))
        read = list(inputs)  # files no output may replace: the image and the mask
        if mask is not None and not isinstance(mask, Mask):
            read += [Path(mask)] if isinstance(mask, (str, Path)) else []
            mask = open_mask(mask, image.size, invert=invert_mask)
        outputs.check_outputs(outputs.written_files(paths, out), inputs=read, overwrite=out.overwrite)
        computed = self.compute(image, text, chosen, progress, mask)
        name = source_name if source_name is not None else (outputs.source_label(source) if inputs else None)
        seconds = round(time.perf_counter() - started, 3)
        records = [r.but(source=name, seconds=seconds) for r in computed.records]
        if stream:
            output.write(outputs.file_bytes(computed.pictures[0], records[0], out.format, out, image))
            output.flush()
            return records
        written = []
        for picture, record, path in zip(computed.pictures, records, paths, strict=True):
            done = record.but(output=str(path))
            outputs.save(picture, done, path, out, image)
            written.append(done)
        return written

    def compute(
        self,
        image: SourceImage,
        instruction: str,
        chosen: EditOptions,
        progress: Progress | None = None,
        mask: Mask | None = None,
    ) -> Computed:
        """One edit's pictures and records (model and revision filled in), written nowhere: :meth:`edit` writes
        them, and a server sends them to the client that writes them, so both save the same way. ``mask`` has
        ``image``'s size; ``chosen`` says how it is used."""
        retouch = retouch_plan(image, chosen, mask)
        latents = None
        if chosen.draw is not None:  # output ``index`` of a ``-n of`` draw: that row of the same noise
            index, of = chosen.draw
            work = retouch.work(image) if retouch is not None else image
            size = self.pipe.model_size(work.size, binning=chosen.binning)
            latents = self.pipe.initial_noise(of, *size, chosen.seed)[index : index + 1]
        result = self._run(
            lambda: self.pipe(
                image,
                instruction,
                num_inference_steps=chosen.steps,
                guidance_scale=chosen.guidance,
                image_guidance_scale=chosen.image_guidance,
                seed=chosen.seed,
                latents=latents,
                num_images_per_prompt=chosen.num_images,
                resolution_binning=chosen.binning,
                callback=progress.step if progress else None,
                on_stage=progress.stage if progress else None,
                retouch=retouch,
            )
        )
        records = [self._named(r) for r in result.records]
        if chosen.draw is not None:
            records = [r.but(seed=chosen.seed, index=chosen.draw[0], num_images=chosen.draw[1]) for r in records]
        return Computed(result.images, records)

    def compute_group(
        self, items: list[tuple[SourceImage, str, int]], chosen: EditOptions, progress: Progress | None = None
    ) -> list[Computed]:
        """Several (image, instruction, seed) edits that share :meth:`group_key`, as one batch; each item gives
        what it would alone."""
        from .engine.pipeline import EditRequest

        results = self._run(
            lambda: self.pipe.edit_batch(
                [EditRequest(image, instruction, seed) for image, instruction, seed in items],
                num_inference_steps=chosen.steps,
                guidance_scale=chosen.guidance,
                image_guidance_scale=chosen.image_guidance,
                num_images_per_prompt=chosen.num_images,
                resolution_binning=chosen.binning,
                callback=progress.step if progress else None,
                on_stage=progress.stage if progress else None,
            )
        )
        return [Computed(r.images, [self._named(record) for record in r.records]) for r in results]

    def group_key(self, image: SourceImage, chosen: EditOptions) -> Hashable:
        """What edits must share to run as one batch: the model size and every parameter but the seed."""
        return self.pipe.model_size(image.size, binning=chosen.binning), _group_key(chosen)

    @property
    def device(self) -> Any:
        """The torch device the edits run on (None when they run elsewhere, in a server)."""
        return self.pipe.device

    @property
    def model_name(self) -> str:
        """The model as outputs record it: its hub id, or a local folder's name (never its path)."""
        return self.resolved.ref.repo_id or Path(self.resolved.path).name

    # ---- many edits -------------------------------------------------------------------------------------------

    def edit_many(
        self,
        jobs: Iterable[EditJob],
        *,
        batch_size: int = 1,
        output_options: OutputOptions | None = None,
    ) -> Iterator[JobOutcome]:
        """Edit each job and say what became of it, in the order the jobs finish.

        Jobs that share a model size and parameters are edited ``batch_size`` at a time. A job whose image cannot
        be opened, whose edit fails (a group that fails is retried one job at a time, after freeing memory, so only
        the culprit fails) or whose output cannot be written fails alone.
        """
        out = output_options or OutputOptions()
        for done in self.compute_many(
            (self.prepare(job, output_format=out.format) for job in jobs), batch_size=batch_size
        ):
            outcome = done if isinstance(done, JobOutcome) else self.save(done, out)
            yield outcome
            if outcome.fatal is not None:
                return

    # The three stages of edit_many, public so a batch can run them on different threads or processes: open
    # (decode ahead), compute (the device), save (encode and write behind).

    def prepare(
        self, job: EditJob, image: SourceImage | None = None, output_format: str | None = None
    ) -> Prepared | JobOutcome:
        """Open a job's image (unless opened already, elsewhere) and find its group key; a bad image, or one its
        output's format (``output_format``, else the output's extension) cannot store, is the job's failure."""
        try:
            image = image if image is not None else open_image(job.source)
            options.check_output_fits(options.output_format(job.output, output_format), image.size, str(job.output))
            mask = None if job.mask is None else open_mask(job.mask, image.size, invert=job.invert_mask)
            # A masked or colour-matched job runs alone: its retouch is its own.
            alone = mask is not None or job.options.color_match
            key = object() if alone else self.group_key(image, job.options)
        except CompactEditError as exc:
            return JobOutcome(job, "failed", error=str(exc))
        return Prepared(job, image, key, mask)

    def compute_many(
        self,
        prepared: Iterable[Prepared | JobOutcome],
        *,
        batch_size: int = 1,
        ready: Callable[[], bool] = lambda: True,
    ) -> Iterator[ComputedJob | JobOutcome]:
        """Edit prepared jobs in groups of up to ``batch_size`` consecutive same-key jobs; nothing is written.

        ``ready()`` says whether another job is at hand: when it is not, a partial group is edited now rather than
        waiting for one (so a job fed from a queue never waits on the next one to arrive).
        """
        size = options.batch_size(batch_size)
        pending: list[Prepared] = []
        for item in prepared:
            if isinstance(item, JobOutcome):
                yield item
                continue
            if pending and item.key != pending[0].key:
                yield from self._compute_jobs(pending)
                pending = []
            pending.append(item)
            if len(pending) >= size or not ready():
                yield from self._compute_jobs(pending)
                pending = []
        if pending:
            yield from self._compute_jobs(pending)

    @staticmethod
    def save(done: ComputedJob, output_options: OutputOptions) -> JobOutcome:
        """Encode and write one computed edit; a full disk is ``fatal`` (every later job would meet it). Static: a
        writer that holds no model (a Ray task) can call it."""
        job = done.job
        written = output_options if job.exif is None else replace(output_options, exif=job.exif)
        try:
            outputs.save(done.picture, done.record, job.output, written, done.image)
        except OutputError as exc:
            fatal = exc if isinstance(exc, DiskFullError) else None
            return JobOutcome(job, "failed", error=str(exc), seed=done.record.seed, fatal=fatal)
        return JobOutcome(job, "ok", record=done.record, seed=done.record.seed)

    def _compute_jobs(self, group: list[Prepared]) -> Iterator[ComputedJob | JobOutcome]:
        seeds = [options.random_seed() if p.job.options.seed is None else p.job.options.seed for p in group]
        started = time.perf_counter()
        first = group[0]
        try:
            if first.mask is not None or first.job.options.color_match:
                chosen = first.job.options.replace(seed=seeds[0])
                results = [self.compute(first.image, first.job.instruction, chosen, mask=first.mask)]
            else:
                results = self.compute_group(
                    [(p.image, p.job.instruction, seed) for p, seed in zip(group, seeds, strict=True)],
                    first.job.options,
                )
        except Exception as exc:  # one job can cause anything; the others go on
            error = describe_failure(exc)
        else:
            error = None
        if error is not None:
            if len(group) == 1:
                yield JobOutcome(group[0].job, "failed", error=error, seed=seeds[0])
                return
            for one in group:
                yield from self._compute_jobs([one])
            return
        seconds = round((time.perf_counter() - started) / len(group), 3)
        for p, result in zip(group, results, strict=True):
            record = result.records[0].but(
                source=outputs.source_label(p.job.source), seconds=seconds, output=str(p.job.output)
            )
            yield ComputedJob(p.job, p.image, result.pictures[0], record)

    # ---- shared -----------------------------------------------------------------------------------------------

    def _run(self, work: Callable[[], Any]) -> Any:
        """Run the engine; after an out-of-memory error, give the memory back before reporting it."""
        try:
            return work()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        # Past the except block, so the failed attempt's frames (and the tensors they hold) are gone.
        self.pipe.speed.release_memory()
        raise OutOfMemoryError()

    def _named(self, record: EditRecord) -> EditRecord:
        """The engine's record completed with what only the Editor knows: the model's name and revision."""
        return record.but(
            model=self.model_name,
            revision=self.resolved.commit,
            loras=[[recorded_adapter(spec), scale] for spec, scale in self.options.loras],
        )


def retouch_plan(image: SourceImage, chosen: EditOptions, mask: Mask | None) -> Retouch | None:
    """What ``chosen`` and ``mask`` ask around the model (crop, blend, paste back, colour match), or None."""
    from .files.compositing import Retouch

    return Retouch.plan(
        image,
        mask,
        band=chosen.feather,
        mode=chosen.mask_mode,
        crop_to_mask=chosen.crop_to_mask,
        color_match=chosen.color_match,
    )


def _group_key(chosen: EditOptions) -> tuple[Any, ...]:
    """What jobs must share to run as one batch (everything but the seed)."""
    return chosen.steps, chosen.guidance, chosen.image_guidance, chosen.num_images, chosen.binning


def _load(model: ModelOptions, status: Callable[[str], None]) -> tuple[Any, Any, list[str]]:
    """Resolve, verify and load: (pipeline, resolved model, notes on speed options that did not apply)."""
    from .engine.devices import resolve_device, resolve_dtype
    from .engine.pipeline import EditPipeline
    from .loading.hub import is_offline, parse_model, resolve

    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    ref = parse_model(model.model, model.revision)
    status(f"resolving {ref.spec}")
    resolved = resolve(ref, offline=is_offline(model.offline))
    status(f"loading {resolved.label()}")
    pipe = EditPipeline.from_pretrained(
        resolved.path,
        device=device,
        dtype=dtype,
        name=resolved.label(),
        offload=model.offload,
        compile=model.compile,
        long_run=model.long_run,
        cuda_graphs=model.cuda_graphs,
        kernels=model.kernels,
        quantize="none" if model.loras else model.quantize,  # with adapters: after fusing them, below
    )
    notes = list(pipe.speed.notes)
    if model.loras:
        from .loading.lora import apply_loras

        status(f"fusing {len(model.loras)} LoRA adapter(s)")
        base = ref.repo_id or Path(resolved.path).name
        notes += apply_loras(pipe.transformer, model.loras, offline=is_offline(model.offline), base_model=base)
        pipe.speed.quantize(model.quantize)  # the adapters add to the full-precision weights, then FP8 rounds once
    return pipe, resolved, notes
