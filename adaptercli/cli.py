"""The `adapter` command line: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import AdapterCliError
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
            if isinstance(exc, KeyboardInterrupt):
                problems = ["interrupted"]
            elif isinstance(exc, OSError):  # the machine's doing: permissions, a full disk, a vanished file
                where = f"{exc.filename}: " if exc.filename else ""
                problems = [f"{where}{exc.strerror or exc}"]
            else:
                problems = getattr(exc, "problems", None) or [str(exc)]
            for problem in problems:
                errors.print(f"[red]error:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
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
    from .recipe import load_recipe
    from .train import train as run

    path = _recipe_path(recipe)
    loaded = load_recipe(path, overrides or [])
    try:
        run(loaded, resume=resume, console=console)
    except KeyboardInterrupt:
        saved = (Path(loaded.output_dir) / "checkpoints" / "latest.json").exists()
        again = " ".join(["adapter train", str(path), *(overrides or []), "--resume" if saved else ""]).strip()
        raise AdapterCliError(
            f"interrupted; {'the latest checkpoint is kept, continue with' if saved else 'no checkpoint yet, start again with'}: {again}"
        ) from None


@app.command()
@_friendly
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file (or the name of a shipped recipe).")],
    overrides: Overrides = None,
) -> None:
    """Check a recipe and what it points at (keys, types, method config, model folder, data files and
    columns, metric, composition members, output folder) and print it resolved, without training."""
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
    from .train import evaluate_run

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
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A text file, one example per line.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
) -> None:
    """Predict the label (and its probability) of each text with a trained run's adapter."""
    from .train import predict as run

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
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()])
    console.print(table)


@app.command()
@_friendly
def summary(
    target: Annotated[str, typer.Argument(help="A recipe (its adapter is built) or a run folder.")],
    overrides: Overrides = None,
) -> None:
    """Show the adapter's parameter table: name, method, parameters, % of the model, active, trainable."""
    path = Path(target)
    if path.is_dir():
        from .train import load_run

        _, model, _, name = load_run(path)
        model.train_adapter(name)  # show what training it would update
    else:
        from .recipe import load_recipe
        from .train import attach_adapter, load_model

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


@app.command()
@_friendly
def export(
    run_dir: Annotated[Path, typer.Argument(help="Output folder of a finished `adapter train`.")],
    to: Annotated[str, typer.Option("--to", help="native, peft, or hub.")] = "native",
    dest: Annotated[str | None, typer.Option("--dest", help="Folder (native/peft) or Hub repo id (hub).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a --dest folder that already holds files.")] = False,
) -> None:
    """Export a trained adapter: a native or PEFT folder, or push it to the Hugging Face Hub."""
    from .train import load_run

    if to not in ("native", "peft", "hub"):
        raise AdapterCliError(f"--to: '{to}' is not one of native, peft, hub")
    if to in ("native", "peft"):
        if not dest:
            raise AdapterCliError("--dest: give the folder to write")
        _check_export_dest(run_dir, Path(dest), force)
    _, model, _, name = load_run(run_dir)
    if to in ("native", "peft"):
        model.save_adapter(dest, name, format=to)
        console.print(f"wrote {to} adapter to {dest}")
    elif to == "hub":
        if not dest:
            raise AdapterCliError("--dest: give the Hub repository id, e.g. user/my-adapter")
        from huggingface_hub import HfApi

        try:
            api = HfApi()  # the token comes from HF_TOKEN or `hf auth login`; it is never printed
            api.create_repo(dest, exist_ok=True)
            api.upload_folder(folder_path=str(run_dir / "adapter"), repo_id=dest)
        except Exception as exc:
            raise AdapterCliError(f"could not push to the Hub repository '{dest}' ({type(exc).__name__}); "
                                  "check the network and your login (HF_TOKEN or `hf auth login`)") from None
        console.print(f"pushed {run_dir / 'adapter'} to {dest}")


def _check_export_dest(run_dir: Path, dest: Path, force: bool) -> None:
    """Never write into a run's own folders; never mix an export into a folder that holds files."""
    target = dest.resolve()
    for own in ("adapter", "best", "checkpoints"):
        folder = (run_dir / own).resolve()
        if target == folder or folder in target.parents:
            raise AdapterCliError(f"--dest: {dest} is inside the run's own {own}/ folder; export somewhere else")
    if target == run_dir.resolve():
        raise AdapterCliError(f"--dest: {dest} is the run folder itself; export somewhere else")
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not force):
        raise AdapterCliError(f"--dest: {dest} already holds files; choose an empty folder or pass --force")


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
