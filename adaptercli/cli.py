"""The `adapter` command line: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import AdapterCliError, RecipeError
from .recipe import shipped_folder

app = typer.Typer(
    help="Train, evaluate and share adapters on frozen Hugging Face transformers, driven by YAML recipes.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(help="List, show and copy the recipes shipped with adaptercli.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

console = Console()
errors = Console(stderr=True)
RECIPES_DIR = shipped_folder("recipes")
_DEBUG = {"on": False}

Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.max_steps=100 adapter.method=seq_bn")]


def _friendly(command):
    """User mistakes become one line per problem and exit code 1; --debug shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (AdapterCliError, OSError, KeyboardInterrupt) as exc:
            if _DEBUG["on"]:
                raise
            if isinstance(exc, RecipeError) and os.environ.get("RANK", "0") != "0":
                raise typer.Exit(1) from None  # under accelerate launch every process finds it: the first says it
            if isinstance(exc, KeyboardInterrupt):
                problems = ["interrupted"]
            elif isinstance(exc, OSError):  # the machine's doing: permissions, a full disk, a vanished file
                where = f"{exc.filename}: " if exc.filename else ""
                problems = [f"{where}{exc.strerror or exc}"]
            else:
                problems = getattr(exc, "problems", None) or [str(exc)]
            from .hub import redact  # a token never reaches the terminal, whatever a library put in a message

            for problem in problems:
                errors.print(f"[red]error:[/red] {escape(redact(problem))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _DEBUG["on"] = debug
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Our progress bar and tables are the output; silence the libraries' own bars and warnings."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    # `datasets` logs a traceback for a file it cannot parse; we report that file in one line.
    datasets.utils.logging.set_verbosity(datasets.logging.CRITICAL)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _recipe_path(recipe: str) -> Path:
    """A recipe file, or the name of a shipped recipe (``rotten_tomatoes_lora``)."""
    path = Path(recipe)
    if path.exists():
        return path
    shipped = RECIPES_DIR / f"{recipe.removesuffix('.yaml')}.yaml"
    if shipped.exists():
        return shipped
    raise AdapterCliError(f"recipe not found: {recipe} (a YAML file, or one of: {', '.join(_shipped())})")


def _shipped() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@app.command()
@_friendly
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file (or the name of a shipped recipe).")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in output_dir.")] = False,
) -> None:
    """Train the recipe's adapter; writes adapter/, checkpoints/, metrics.jsonl and curves.png to output_dir."""
    _run_training("train", recipe, overrides or [], resume)


def _run_training(command: str, recipe: str, overrides: list[str], resume: bool) -> None:
    """`adapter train` and `adapter fuse`: load the recipe, train, and on Ctrl-C say how to resume."""
    from .recipe import load_recipe
    from .train import train as run

    path = _recipe_path(recipe)
    loaded = load_recipe(path, overrides)
    if command == "fuse" and (loaded.composition is None or loaded.composition.type != "fuse"):
        raise AdapterCliError("composition: `adapter fuse` needs a recipe with composition: {type: fuse, adapters: "
                              "[...]}; train other recipes with `adapter train`")
    try:
        run(loaded, resume=resume, console=console)
    except KeyboardInterrupt:
        saved = (Path(loaded.output_dir) / "checkpoints" / "latest.json").exists()
        again = " ".join([f"adapter {command}", str(path), *overrides, "--resume" if saved else ""]).strip()
        raise AdapterCliError(
            f"interrupted; {'the latest checkpoint is kept, continue with' if saved else 'no checkpoint yet, start again with'}: {again}"
        ) from None


@app.command()
@_friendly
def fuse(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file whose composition is {type: fuse, adapters: [...]}.")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in output_dir.")] = False,
) -> None:
    """Train an AdapterFusion over the recipe's member adapters (run folders, adapter folders or Hub ids), which stay frozen; writes the fusion and its head to adapter/, and fusion_attention.png."""
    _run_training("fuse", recipe, overrides or [], resume)


@app.command()
@_friendly
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file (or the name of a shipped recipe).")],
    overrides: Overrides = None,
) -> None:
    """Check a recipe and what it points at (keys, types, method config, model folder, data files and columns, metric, composition members, output folder) and print it resolved, without training."""
    from .checks import preflight
    from .recipe import load_recipe, recipe_to_yaml

    loaded = load_recipe(_recipe_path(recipe), overrides or [])
    checked = preflight(loaded, load_hub_data=False)
    console.print(recipe_to_yaml(loaded), highlight=False, markup=False)
    for note in checked.notes or []:
        errors.print(f"note: {note}", highlight=False, soft_wrap=True)
    errors.print("[green]recipe is valid[/green]")


@app.command(name="eval")
@_friendly
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Output folder of a finished `adapter train`.")],
    split: Annotated[str, typer.Option(help="Which split to evaluate.")] = "validation",
) -> None:
    """Evaluate a trained run's adapter on its data."""
    from .inference import evaluate_run

    metrics = evaluate_run(run_dir, split)
    table = Table(title=f"{run_dir} — {split}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)


@app.command()
@_friendly
def predict(
    run_dir: Annotated[Path, typer.Argument(help="Output folder of a finished `adapter train`.")],
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify (a seq2seq run: source texts).")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A text file, one example per line.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
) -> None:
    """Predict the label (and its probability) of each text with a trained run's adapter; a tagging run tags each word (words split at spaces); a seq2seq run writes each text's summary or translation."""
    from .inference import predict as run

    items = list(texts or [])
    if file is not None:
        if not file.exists():
            raise AdapterCliError(f"--file: file not found: {file}")
        items += [line for line in file.read_text().splitlines() if line.strip()]
    if not items:
        raise AdapterCliError("give texts to classify as arguments or with --file")
    results = run(run_dir, items)
    if as_json:
        for row in results:
            print(json.dumps(row))
        return
    table = Table()
    for column in results[0]:
        table.add_column(column)
    for row in results:
        table.add_row(*[_cell(v) for v in row.values()])
    console.print(table)


def _cell(value: Any) -> str:
    """A table cell: a probability to four places; a tagged text as ``word/TAG`` pairs."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list) and all(isinstance(v, dict) and "tag" in v for v in value):
        return " ".join(f"{v['token']}/{v['tag']}" for v in value)
    return str(value)


@app.command()
@_friendly
def generate(
    run_dir: Annotated[Path, typer.Argument(help="Output folder of a finished causal-LM, instruction-tuning or seq2seq run.")],
    prompts: Annotated[list[str], typer.Argument(help="Prompts; an instruction-tuned run reads each as a user turn, a seq2seq run as a source text.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Stop after this many tokens.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0: greedy; above 0: sampled.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the sampling.")] = 0,
    num_beams: Annotated[int, typer.Option("--num-beams", min=1, help="Seq2seq runs: beam search with this many beams (1: greedy).")] = 1,
) -> None:
    """Answer each prompt with a trained causal-LM run's adapter (the chat template of an instruction-tuned run frames the prompt), or write a seq2seq run's summary or translation of it (after its data.source_prefix), to try the result."""
    from .inference import generate as run

    answers = run(run_dir, prompts, max_new_tokens, temperature, seed, num_beams)
    for prompt, answer in zip(prompts, answers, strict=True):
        if len(prompts) > 1:
            console.print(f"[bold]> {escape(prompt)}[/bold]", highlight=False)
        console.print(escape(answer), highlight=False, soft_wrap=True)


@app.command()
@_friendly
def serve(
    config: Annotated[Path | None, typer.Option("--config", help="A serve.yaml: model, adapters, host, port, batching and limits.")] = None,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="NAME=SOURCE: serve a run folder, adapter folder, Hub id or index id as NAME (repeatable).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on (default 8000).")] = None,
    max_batch_size: Annotated[int | None, typer.Option("--max-batch-size", help="Most texts in one mixed forward pass (default 32).")] = None,
    max_wait_ms: Annotated[float | None, typer.Option("--max-wait-ms", help="How long a request waits for others to batch with (default 5).")] = None,
) -> None:
    """Serve adapters over HTTP on one frozen base model: each request names its adapter, requests arriving together run as one mixed batch (POST /v1/predict, /v1/generate; /docs describes the API)."""
    from .serve import serve as run
    from .serving import read_settings

    pairs = [a.split("=", 1) for a in adapter or []]
    bad = [a for a, pair in zip(adapter or [], pairs, strict=True) if len(pair) != 2 or not all(pair)]
    if bad:
        raise AdapterCliError(f"--adapter: expected NAME=SOURCE, got '{bad[0]}'")
    settings = read_settings(config, adapters=dict(pairs), host=host, port=port, max_batch_size=max_batch_size,
                             max_wait_ms=max_wait_ms)
    run(settings)


@app.command()
@_friendly
def summary(
    target: Annotated[str, typer.Argument(help="A recipe (its adapter is built) or a run folder.")],
    overrides: Overrides = None,
) -> None:
    """Show the adapter's parameter table: name, method, parameters, % of the model, active, trainable."""
    path = Path(target)
    if path.is_dir():
        from .runs import load_run

        recipe, model, _, name = load_run(path)
        fusion_report = path / "fusion_attention.json"
        if recipe.composition is not None and recipe.composition.type == "fuse":
            model.train_adapter_fusion(model.active_adapters)  # show what training it would update
            from .reports import fusion_attention_report, fusion_table

            report = json.loads(fusion_report.read_text()) if fusion_report.exists() else fusion_attention_report(path)
            console.print(fusion_table(report))
        else:
            model.train_adapter(name)
    else:
        from .recipe import load_recipe
        from .runs import attach_adapter, load_model

        recipe = load_recipe(_recipe_path(target), overrides or [])
        model = load_model(recipe)[0]
        model.train_adapter(attach_adapter(model, recipe))
    table = Table(title="Adapters")
    for column in ("name", "method", "params", "% of model", "active", "trainable"):
        table.add_column(column, justify="right" if column in ("params", "% of model") else "left")
    for row in model.adapter_summary():
        table.add_row(row["name"], row["method"], f"{row['params']:,}", f"{row['percent']:.3f}",
                      "yes" if row["active"] else "no", "yes" if row["trainable"] else "no")
    console.print(table)


TaskOpt = Annotated[str | None, typer.Option("--task", help="What the adapter does, e.g. sentiment (default: from the data set).")]
DatasetOpt = Annotated[str | None, typer.Option("--dataset", help="Data set name for the card and index (default: the recipe's).")]
BaseModelOpt = Annotated[str | None, typer.Option("--base-model", help="Hub id of the base model, when the run used a local folder.")]


@app.command()
@_friendly
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (training, stack or fusion), an adapter folder or an adapter setup folder.")],
    to: Annotated[str, typer.Option("--to", help="native, hub, peft, adapterhub or merged.")] = "native",
    dest: Annotated[str | None, typer.Option("--dest", help="Folder to write, or the Hub repository id (--to hub).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a --dest folder that already holds files.")] = False,
    private: Annotated[bool, typer.Option("--private", help="--to hub: create the repository private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="--to hub: the branch to push to.")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", help="--to hub: the commit message.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="--to hub: list what would be uploaded; push nothing.")] = False,
    index: Annotated[str | None, typer.Option("--index", help="--to hub: also add the pushed adapter to this index (a folder, a git URL or hf:org/name).")] = None,
    org: Annotated[str | None, typer.Option("--org", help="With --index: the org of its id (default: the repository's).")] = None,
    task: TaskOpt = None,
    dataset: DatasetOpt = None,
    base_model: BaseModelOpt = None,
    license: Annotated[str, typer.Option("--license", help="License for the model card.")] = "apache-2.0",
) -> None:
    """Export a trained adapter with a model card: our folder (native), pushed to the Hugging Face
    Hub (hub), a PEFT LoRA/IA3 folder (peft), an AdapterHub `adapters` folder (adapterhub), or the
    base model with the adapter merged in (merged). A fusion or stack run (or a setup folder) goes to
    native and hub as one adapter setup: members, fusion, head, composition, for `load_adapter_setup`.
    The token comes from HF_TOKEN or `hf auth login`."""
    from .export import TARGETS, open_source
    from .export import export as run_export

    if to not in TARGETS:
        raise AdapterCliError(f"--to: '{to}' is not one of {', '.join(TARGETS)}")
    if index and (to != "hub" or dry_run):
        raise AdapterCliError("--index: goes with --to hub (without --dry-run); use `adapter hub add` for other exports")
    if index:  # before pushing: a bad --index stops it
        _check_index_spec(index)
    source = open_source(run_dir, base_model=base_model, task=task, dataset=dataset, license=license)
    if index and source.setup:
        raise AdapterCliError("--index: an adapter setup cannot be indexed yet; index its members with `adapter hub add`")
    result = run_export(source, to, dest or "", force=force, private=private, revision=revision,
                        commit_message=commit_message, dry_run=dry_run)
    for note in result.notes:
        errors.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    if to != "hub":
        console.print(f"wrote {to} export of {source.card.name} to {escape(result.dest)} ({len(result.files)} files)",
                      highlight=False)
        return
    table = Table(title=f"{'would upload' if dry_run else 'uploaded'} to {result.dest}")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for name, size in result.files:
        table.add_row(escape(name), f"{size:,}")
    console.print(table)
    if result.pushed is None:
        console.print("dry run: nothing was pushed")
        return
    console.print(f"pushed commit {result.pushed.commit} to {escape(result.pushed.url)}", highlight=False,
                  soft_wrap=True)
    if index:
        from .hub import split_revision
        from .publish import publish

        repo_id = split_revision(result.dest)[0]
        published = publish(index, source, org=org or repo_id.split("/")[0], repo=repo_id,
                            revision=result.pushed.commit, force=force)
        _say_published(published)


@app.command()
@_friendly
def merge(
    sources: Annotated[list[str], typer.Argument(help="Adapters to merge (same method): run folders, adapter folders, "
                                                     "Hub ids or index ids.")],
    dest: Annotated[Path, typer.Option("--dest", help="Folder to write the merged adapter to.")],
    strategy: Annotated[str, typer.Option("--strategy", help="linear, task_arithmetic, magnitude_prune, ties, "
                                          "dare_linear, dare_ties; for LoRA also cat, svd, <strategy>_svd.")] = "linear",
    weights: Annotated[str | None, typer.Option("--weights", help="Comma-separated, one per adapter (default: equal).")] = None,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize",
                                            help="Scale the weights to sum to 1 (PEFT does not).")] = True,
    density: Annotated[float | None, typer.Option("--density", help="Share of each adapter's entries kept, in (0, 1]: "
                                                  "ties, dare_*, magnitude_prune.")] = None,
    majority_sign_method: Annotated[str, typer.Option("--majority-sign-method", help="ties, dare_ties: total or "
                                                      "frequency.")] = "total",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the DARE masks.")] = 0,
    svd_rank: Annotated[int | None, typer.Option("--svd-rank", help="LoRA svd strategies: the merged rank "
                                                 "(default: the largest source rank).")] = None,
    name: Annotated[str, typer.Option("--name", help="Name of the merged adapter.")] = "merged",
    head_from: Annotated[int | None, typer.Option("--head-from", help="Copy the head of this source (1-based) onto "
                                                  "the merged adapter.")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", help="The base model (Hub id or folder) when the "
                                                   "adapter files do not name it.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a --dest folder that already holds files.")] = False,
) -> None:
    """Merge adapters of one method into a new adapter folder: AdapterHub's weighted average, task
    arithmetic, TIES and DARE (as PEFT's add_weighted_adapter), and for LoRA cat and SVD. A merge that
    has no meaning (mixed methods or base models, a bad density) is refused before anything is written."""
    from .combine import merge_sources

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        raise AdapterCliError(f"--weights: expected comma-separated numbers, got '{weights}'") from None
    if parsed is not None and len(parsed) != len(sources):
        raise AdapterCliError(f"--weights: {len(parsed)} weights for {len(sources)} adapters")
    result = merge_sources(sources, dest, strategy=strategy, weights=parsed, normalize_weights=normalize,
                           density=density, majority_sign_method=majority_sign_method, seed=seed, svd_rank=svd_rank,
                           name=name, head_from=head_from, base_model=base_model, force=force)
    console.print(f"wrote {result.method} adapter '{result.name}' ({result.parameters:,} parameters) merged from "
                  f"{len(result.sources)} adapters by {strategy} to {escape(str(result.dest))}", highlight=False,
                  soft_wrap=True)


# Named after AdapterHub's "Hub" (its index of shared adapters), which this group reproduces; what
# it works on is an adapter index. Pushing files to the Hugging Face Hub is `adapter export --to hub`.
hub_app = typer.Typer(help="The adapter index (AdapterHub's Hub: YAML descriptors of shared adapters, loaded by "
                           "id task/dataset@org): add runs, search by task, data set, model and method, show one. "
                           "To push files to the Hugging Face Hub, use `adapter export --to hub`.",
                      no_args_is_help=True)
app.add_typer(hub_app, name="hub")
IndexOpt = Annotated[str | None, typer.Option("--index", help="Index: a folder, a git URL or hf:org/name (default: $ADAPTERCLI_INDEX).")]


def _index_folder(spec: str | None) -> Path:
    from .index import open_index

    return open_index(spec)


def _check_index_spec(spec: str) -> None:
    """A local --index must be a folder (or not exist yet); URLs are checked when used."""
    from .index import index_kind

    if index_kind(spec) == "folder" and Path(spec).expanduser().is_file():
        raise AdapterCliError(f"--index: {spec} is a file, not a folder")


def _say_published(published) -> None:
    d = published.descriptor
    where = f"{published.path} in {published.index}" if published.commit else published.path
    commit = f", commit {published.commit[:12]}" if published.commit else ""
    console.print(f"added {d.id} ({d.method} on {d.model.get('name') or d.model.get('type')}) to {escape(where)}{commit}",
                  highlight=False, soft_wrap=True)


@hub_app.command("add")
@_friendly
def hub_add(
    run_dir: Annotated[Path, typer.Argument(help="A run folder, or an adapter folder.")],
    index: Annotated[str, typer.Option("--index", help="Where the index lives: a folder (created if missing), a git "
                                       "repository URL (cloned, committed, pushed) or hf:[datasets/]org/name (uploaded).")],
    org: Annotated[str | None, typer.Option("--org", help="Who shares it: the org of the id task/dataset@org.")] = None,
    repo: Annotated[str | None, typer.Option("--repo", help="Hub repository (org/name[@revision]) holding its files; "
                                             "default: a copy beside the descriptor.")] = None,
    task: TaskOpt = None,
    dataset: DatasetOpt = None,
    base_model: BaseModelOpt = None,
    description: Annotated[str, typer.Option("--description", help="One line about it.")] = "",
    force: Annotated[bool, typer.Option("--force", help="Replace a descriptor for the same id, model and method.")] = False,
) -> None:
    """Describe a run's adapter in an index (task, data set, base model, method, metrics, files
    and their sha256), so `adapter hub search` finds it and `task/dataset@org` loads it. A git
    index gets a commit pushed to its remote; a Hub index, an upload."""
    from .export import open_source
    from .hub import split_revision
    from .publish import publish

    _check_index_spec(index)
    source = open_source(run_dir, base_model=base_model, task=task, dataset=dataset)
    repo_id, at = split_revision(repo) if repo else (None, None)
    published = publish(index, source, org=org or (repo_id.split("/")[0] if repo_id else "local"), repo=repo_id,
                        revision=at, description=description, force=force)
    _say_published(published)


@hub_app.command("validate")
@_friendly
def hub_validate(
    index: Annotated[str, typer.Argument(metavar="INDEX", help="The index: a folder, a git URL or hf:org/name.")],
) -> None:
    """Check every descriptor of an index: the schema (missing fields, wrong types, the method and
    its config), ids claimed twice for the same base model and method, each reachable file's
    sha256 and size, base models named by Hub ids. Prints every problem, one line each, and exits 1 if any."""
    from .index import open_index
    from .index_checks import require_valid

    report = require_valid(open_index(index))
    for note in report.notes:
        errors.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    count = len(report.descriptors)
    console.print(f"index is valid: {count} descriptor{'s' if count != 1 else ''}, {report.files_checked} files "
                  "checked against their sha256", highlight=False)


@hub_app.command("site")
@_friendly
def hub_site(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the site to (replaced if this command wrote it).")],
    index: IndexOpt = None,
    index_url: Annotated[str | None, typer.Option("--index-url", help="How the pages' load lines name the index, "
                                                  "e.g. its published URL (default: --index).")] = None,
    title: Annotated[str, typer.Option("--title", help="The site's title.")] = "Explore adapters",
) -> None:
    """Make the Explore page: a static site (plain files, works from file://) with filters and
    search over the index, a page per adapter with the lines that load it, and a comparison per
    task (metric against size). A broken index is refused, as `adapter hub validate` reports it."""
    from .index import INDEX_ENV
    from .site import build_site

    spec = index or os.environ.get(INDEX_ENV)
    if not spec:
        raise AdapterCliError(f"--index: give the index (a folder, a git URL or hf:org/name) or set {INDEX_ENV}")
    site = build_site(spec, out, index_url=index_url, title=title)
    for note in site.notes:
        errors.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    adapters = f"{site.adapters} adapter{'s' if site.adapters != 1 else ''}"
    console.print(f"wrote {site.pages} pages for {adapters} to {escape(str(site.out))} "
                  f"(open {escape(str(site.out / 'index.html'))})", highlight=False, soft_wrap=True)


@hub_app.command("search")
@_friendly
def hub_search(
    index: IndexOpt = None,
    task: Annotated[str | None, typer.Option("--task", help="e.g. sentiment")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="e.g. rotten_tomatoes")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Part of the base model's Hub id, or its type (bert).")] = None,
    method: Annotated[str | None, typer.Option("--method", help="e.g. lora, seq_bn")] = None,
) -> None:
    """List the index's adapters that match every filter given."""
    from .index import descriptors, search

    found = search(descriptors(_index_folder(index)), task=task, dataset=dataset, model=model, method=method)
    if not found:
        errors.print("no adapter in the index matches")
        raise typer.Exit(1)
    table = Table(title=f"{len(found)} adapter{'s' if len(found) != 1 else ''}")
    for column in ("id", "base model", "method", "metrics", "files"):
        table.add_column(column)
    for d in found:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in d.metrics.items() if k != "loss")
        table.add_row(d.id, str(d.model.get("name") or d.model.get("type")), d.method, metrics, escape(d.location))
    console.print(table)


@hub_app.command("show")
@_friendly
def hub_show(
    adapter_id: Annotated[str, typer.Argument(metavar="ID", help="task/dataset@org")],
    index: IndexOpt = None,
) -> None:
    """Show everything the index says about an id (one table per base model and method)."""
    from .index import descriptors, find

    found = find(descriptors(_index_folder(index)), adapter_id)
    if not found:
        raise AdapterCliError(f"{adapter_id}: not in the index")
    for d in found:
        table = Table(title=d.id, show_header=False)
        table.add_column("field")
        table.add_column("value")
        rows = [("name", d.name), ("base model", d.model.get("name")), ("model type", d.model.get("type")),
                ("hidden size", d.model.get("hidden_size")), ("method", d.method),
                ("head", f"{d.head['type']} ({', '.join(d.head.get('labels') or [])})" if d.head else None),
                *[(f"parameters: {part}", f"{count:,}") for part, count in d.parameters.items()],
                *[(f"metric: {k}", f"{v:.4f}") for k, v in d.metrics.items()],
                ("files", d.location), *[(f"sha256: {n}", h) for n, h in (d.files.get("sha256") or {}).items()],
                ("description", d.description), ("added", d.added), ("descriptor", str(d.path))]
        for key, value in rows:
            if value not in (None, ""):
                table.add_row(key, escape(str(value)))
        console.print(table)


@recipes_app.command("list")
def recipes_list() -> None:
    """List the shipped recipes."""
    for name in _shipped():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        console.print(f"[bold]{name}[/bold]  {first}", highlight=False)


@recipes_app.command("show")
@_friendly
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name, from `adapter recipes list`.")]) -> None:
    """Print a shipped recipe."""
    print(_recipe_path(name).read_text(), end="")


@recipes_app.command("cp")
@_friendly
def recipes_cp(
    name: Annotated[str, typer.Argument(help="Recipe name, from `adapter recipes list`.")],
    dest: Annotated[Path, typer.Argument(help="Where to write the copy (a file or a folder).")],
) -> None:
    """Copy a shipped recipe to edit it."""
    source = _recipe_path(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise AdapterCliError(f"{target} exists; not overwriting it")
    shutil.copyfile(source, target)
    console.print(f"copied {source.name} to {target}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
