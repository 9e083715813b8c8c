"""Chat data files: JSONL read line by line (errors name the line), and JSON, Parquet, CSV, a `datasets`
folder or a cached hub dataset read through `datasets` (errors name the row).

For training, `read_source` never holds the records in a list: JSONL records are written to Arrow as
they are read (datasets.Dataset.from_generator), tables are converted by `datasets.map`; either way
memory holds a batch, whatever the file's size. Eval and generate read lists (`read_data`), which they
keep anyway.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from prolora_cli.data.formats import DATA_FORMATS, BadRecord, parse_record
from prolora_cli.errors import UserError


def read_data(path: str | Path, skip_bad_lines: bool = False, data_format: str = "auto",
              split: str = "train", prompt_only: bool = False) -> tuple:
    """(records, how many bad ones were skipped) of a chat data source (see the module docstring):
    a list for JSONL, a memory-mapped dataset for the rest. Each record says which shape it was read as
    ("format") and where it was ("line" or "row"). `prompt_only`: records to generate for (see
    formats.parse_record)."""
    if data_format not in DATA_FORMATS:
        raise UserError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    if is_hub_id(path):
        return table_records(str(path), load_hub(str(path), split), data_format, skip_bad_lines, prompt_only)
    path = Path(path)
    if path.suffix == ".jsonl":
        return collect(path, "line", jsonl_objects(path), data_format, skip_bad_lines, prompt_only)
    return table_records(str(path), load_table(path), data_format, skip_bad_lines, prompt_only)


def table_records(source: str, table, data_format: str, skip_bad: bool, prompt_only: bool = False):
    """A table's rows as chat records, converted and checked by `datasets.map`: the result is another
    memory-mapped dataset (messages, format, row, and adapter when the table has that column), never a
    Python list. Its temporary files go to a scratch folder, not beside the user's data (datasets'
    caching is off meanwhile)."""
    adapters = prompt_only and "adapter" in table.column_names  # a null cell: the base model

    def convert(row, i):
        try:
            record = parse_record(dict(row), data_format, prompt_only)  # map hands over a lazy mapping
            out = {"messages": record["messages"], "format": record["format"], "row": i, "bad": ""}
        except BadRecord as e:
            out = {"messages": [], "format": "", "row": i, "bad": str(e)}
        return {**out, "adapter": row["adapter"]} if adapters else out

    caching = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        ds = table.map(convert, with_indices=True, remove_columns=table.column_names)
        bad = ds.filter(lambda problem: problem != "", input_columns="bad")
        if len(bad) and not skip_bad:
            raise UserError(f"{source}, row {bad[0]['row']}: {bad[0]['bad']} "
                            f"(fix it, or pass --skip-bad-lines to skip such rows)")
        good = ds.filter(lambda problem: problem == "", input_columns="bad").remove_columns("bad")
    finally:
        if caching:
            datasets.enable_caching()
    if len(good) == 0:
        raise UserError(f"{source}: no examples" + (f" ({len(bad)} bad rows skipped)" if len(bad) else ""))
    return good, len(bad)


def is_hub_id(path) -> bool:
    """'org/name' that is no local path: a dataset on the Hugging Face hub (read from the local cache)."""
    text = str(path)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/", "~")) \
        and not Path(text).suffix


def load_hub(name: str, split: str):
    """A hub dataset from the local cache only (`huggingface-cli download --repo-type dataset` or an
    earlier load_dataset fills it): a training run never waits on the network."""
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - not cached, or a bad split: both mean "not readable here"
        raise UserError(f"{name}: no such local file, and no cached hub dataset of that name with split "
                        f"{split!r} ({str(e).splitlines()[0]})") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def read_jsonl(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """A chat JSONL file's records (eval reads JSONL only)."""
    return collect(Path(path), "line", jsonl_objects(Path(path)), "auto", skip_bad_lines)


def parsed(path: Path, unit: str, objects, data_format: str, skip_bad: bool, counts: Counter,
           prompt_only: bool = False):
    """Records from (position, object) pairs; a bad one stops with one line naming the file and position
    (or is skipped and counted in counts["bad"]). An object may be the BadRecord its line already raised.
    counts[shape] counts the records read as each shape."""
    for position, obj in objects:
        try:
            if isinstance(obj, BadRecord):
                raise obj
            record = parse_record(obj, data_format, prompt_only)
        except BadRecord as e:
            if not skip_bad:
                raise UserError(f"{path}, {unit} {position}: {e} "
                                f"(fix it, or pass --skip-bad-lines to skip such {unit}s)") from None
            counts["bad"] += 1
            continue
        counts[record["format"]] += 1
        record[unit] = position
        yield record


def no_examples(path, skipped: int, unit: str) -> UserError:
    return UserError(f"{path}: no examples" + (f" ({skipped} bad {unit}s skipped)" if skipped else ""))


def collect(path: Path, unit: str, objects, data_format: str, skip_bad: bool,
            prompt_only: bool = False) -> tuple[list[dict], int]:
    """The records of (position, object) pairs as a list (see `parsed`), and how many bad ones were skipped."""
    counts: Counter = Counter()
    records = list(parsed(path, unit, objects, data_format, skip_bad, counts, prompt_only))
    if not records:
        raise no_examples(path, counts["bad"], unit)
    return records, counts["bad"]


RECORD_FEATURES = datasets.Features({
    "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
    "format": datasets.Value("string"), "line": datasets.Value("int64")})


def read_source(path, skip_bad_lines: bool, data_format: str, split: str, scratch: Path) -> tuple:
    """(records as a memory-mapped dataset: messages, format, and line or row; how many bad records were
    skipped; how many records of each shape) of one --data source, for training. Its Arrow files go to
    `scratch`."""
    if data_format not in DATA_FORMATS:
        raise UserError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    if is_hub_id(path) or Path(path).suffix != ".jsonl":
        table = load_hub(str(path), split) if is_hub_id(path) else load_table(Path(path))
        records, skipped = table_records(str(path), table, data_format, skip_bad_lines)
        column = records.select_columns(["format"]).with_format("arrow")[:]["format"]  # filtered rows only
        shapes = pa.compute.value_counts(column).to_pylist()
        return records, skipped, Counter({s["values"]: s["counts"] for s in shapes})
    counts: Counter = Counter()

    def generate():
        for r in parsed(Path(path), "line", jsonl_objects(Path(path)), data_format, skip_bad_lines, counts):
            yield {"messages": r["messages"], "format": r["format"], "line": r["line"]}

    try:
        records = datasets.Dataset.from_generator(generate, features=RECORD_FEATURES, cache_dir=str(scratch))
    except datasets.exceptions.DatasetGenerationError as e:  # our one-line error, raised inside the generator
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise
    skipped = counts.pop("bad", 0)
    if len(records) == 0:
        raise no_examples(path, skipped, "line")
    return records, skipped, counts


def jsonl_objects(path: Path, strict: bool = False):
    """(line number, parsed JSON or the BadRecord saying why not) for each non-blank line; `strict`
    stops at the first bad line with a UserError instead. A `.gz` file is read through gzip (HumanEval
    ships that way)."""
    if not path.is_file():
        raise UserError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                # Windows editors start a UTF-8 file with a byte-order mark.
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not text.strip():
                    continue
                yield lineno, json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                bad = BadRecord("not valid UTF-8" if isinstance(e, UnicodeDecodeError)
                                else f"malformed JSON ({e.msg} at column {e.colno})")
                if strict:
                    raise UserError(f"{path}, line {lineno}: {bad}") from None
                yield lineno, bad


def load_table(path: Path):
    """JSON, Parquet, CSV or a `datasets.save_to_disk` folder, through `datasets` (memory-mapped)."""
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
            raise UserError(f"{path}: a folder that is not a saved dataset (no dataset_info.json)")
        loaded = datasets.load_from_disk(str(path))
        return loaded[next(iter(loaded))] if isinstance(loaded, datasets.DatasetDict) else loaded
    builders = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if not path.is_file():
        raise UserError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    if path.suffix not in builders:
        raise UserError(f"{path}: unknown data file type (use .jsonl, .json, .parquet, .csv or a saved dataset folder)")
    try:
        return datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(f"{path}: cannot read it as {builders[path.suffix].upper()} ({str(e).splitlines()[0]})") from None


def describe_formats(counts: Counter) -> str:
    """'alpaca' or '3 messages, 2 sharegpt': what --data-format auto found, from each shape's count."""
    return next(iter(counts)) if len(counts) == 1 else ", ".join(f"{n:,} {f}" for f, n in counts.most_common())
