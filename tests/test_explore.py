"""The Explore page and publishing an index (`adapter hub site | validate`, `adapter hub add --index`
to a git or Hub repository): adaptercli/site.py, adaptercli/index_checks.py, adaptercli/publish.py.

An index of eleven adapters is made here: two trained for real (2 steps on the tiny BERT, so the
load line a page shows can be checked against the run's own predictions) and nine small native
adapter folders with made-up metrics. The browser test drives headless Chromium (Debian's
`chromium` and `chromium-driver`, which `make install` installs) through selenium; the base
model of the load line is served under its Hub id by the test Hub (tests/hub_server.py), so the
lines run exactly as shown. The git index is a bare repository served by `git daemon` on
127.0.0.1; the Hub index, a data set repository on the test Hub."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml
from conftest import write_recipe
from hub_server import HubServer, find_olah
from transformers import AutoTokenizer
from typer.testing import CliRunner

import adaptercli
from adaptercli.cli import app
from adaptercli.export import add_to_index, open_source
from adaptercli.index import descriptors, search
from adaptercli.site import slug_of

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
OFFLINE = {"HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
BASE = "google/bert_uncased_L-2_H-128_A-2"  # the Hub id the tiny test model stands in for
OTHER = "prajjwal1/bert-tiny"
TEXTS = ["great movie number 7", "awful movie number 3 , really"]
# The made-up part of the index: (method, task, dataset, org, base model, accuracy).
SMALL = [("ia3", "sentiment", "movies", "lab", BASE, 0.71), ("prefix_tuning", "sentiment", "imdb", "lab", OTHER, 0.64),
         ("lora", "sentiment", "imdb", "me", OTHER, 0.83), ("lora", "nli", "rte", "lab", BASE, 0.58),
         ("par_bn", "nli", "rte", "lab", BASE, 0.61), ("loreft", "nli", "mnli", "me", OTHER, 0.55),
         ("dora", "spam", "sms", "lab", BASE, 0.97), ("prompt_tuning", "question-type", "trec", "me", BASE, 0.42),
         ("double_seq_bn", "sentiment", "movies", "lab", OTHER, 0.77)]
SCREENSHOTS = os.environ.get("ADAPTERCLI_SCREENSHOTS")  # a folder: the browser test saves its screenshots there


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptercli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)


# -- the runs, the index and the servers -----------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir: Path, sentiment_csv: Path) -> dict[str, Path]:
    """Two finished runs (LoRA and seq_bn), 2 steps each."""
    found = {}
    for method in ("lora", "seq_bn"):
        folder = tmp_path_factory.mktemp(method)
        recipe = write_recipe(folder, tiny_bert_dir, sentiment_csv, method=method, name=f"senti-{method}",
                              max_steps=2, save_steps=2, eval_steps=2, logging_steps=1, metric_for_best="accuracy")
        result = runner.invoke(app, ["train", str(recipe)], env=OFFLINE)
        assert result.exit_code == 0, result.output
        found[method] = folder / "run"
    return found


def run_logits(run: Path) -> torch.Tensor:
    from adaptercli.runs import load_run

    _, model, tokenizer, _ = load_run(run)
    with torch.no_grad():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def small_adapter(folder: Path, method: str, tiny_bert_dir: Path, seed: int) -> Path:
    """A saved adapter (with a 2-label head) on the tiny BERT, its weights nudged off their init."""
    from transformers import AutoModel

    model = adaptercli.AdapterModel(AutoModel.from_pretrained(tiny_bert_dir))
    model.add_adapter("x", method)
    model.add_classification_head("x", num_labels=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_state.adapter_parameters("x").values():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    model.save_adapter(folder, "x")
    return folder


@pytest.fixture(scope="module")
def index(runs: dict[str, Path], tmp_path_factory, tiny_bert_dir: Path) -> Path:
    """Eleven adapters: the two runs through `adapter hub add`, nine small ones through add_to_index."""
    folder = tmp_path_factory.mktemp("index") / "index"
    for method, run in runs.items():
        added = runner.invoke(app, ["hub", "add", str(run), "--index", str(folder), "--task", "sentiment", "--dataset",
                                    "movies", "--org", "me", "--base-model", BASE, "--description",
                                    f"trained for two steps with {method}"], env=OFFLINE)
        assert added.exit_code == 0, added.output
    made = tmp_path_factory.mktemp("small")
    for seed, (method, task, dataset, org, base, accuracy) in enumerate(SMALL):
        source = open_source(small_adapter(made / f"{method}-{seed}", method, tiny_bert_dir, seed), base_model=base,
                             task=task, dataset=dataset)
        source.card.metrics = {"accuracy": accuracy, "loss": round(1 - accuracy, 3)}  # made up for the page
        add_to_index(folder, source, org=org, description=f"a small {method} adapter for {task}")
    assert len(descriptors(folder)) == 11
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_bert_dir: Path):
    """The test Hub, holding the tiny BERT under the Hub id the descriptors name (BASE)."""
    from huggingface_hub import HfApi

    if find_olah() is None:
        pytest.fail("olah-cli not found: `make install` creates .venv-hub/ with olah (the test Hub server)")
    with HubServer(tmp_path_factory.mktemp("hub"), token=f"hf_{secrets.token_hex(16)}") as server:
        api = HfApi(endpoint=server.endpoint, token=server.token)
        api.create_repo(BASE)
        api.upload_folder(folder_path=str(tiny_bert_dir), repo_id=BASE)
        yield server


@pytest.fixture(scope="module")
def hub_env(hub, tmp_path_factory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ADAPTERCLI_INDEX"))}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path_factory.mktemp("hf")),
            "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_COLOR": "1", "COLUMNS": "200"}


# Runs Python lines in a fresh process (it reads HF_ENDPOINT), then prints the logits of TEXTS
# through `model`. The tokenizer is the tiny BERT's own (olah cannot list a repository's tree,
# which AutoTokenizer asks the Hub for; from_pretrained of the model does not).
SCORE = """
import json, torch
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})
with torch.no_grad():
    print(json.dumps(model(**tokenizer({texts!r}, padding=True, return_tensors="pt")).logits.tolist()))
"""


def run_lines(lines: str, env: dict, tokenizer: Path) -> torch.Tensor:
    result = subprocess.run([sys.executable, "-c", lines + "\n" + SCORE.format(tokenizer=str(tokenizer), texts=TEXTS)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def site(index: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "explore"
    result = runner.invoke(app, ["hub", "site", "--index", str(index), "--out", str(out)], env=OFFLINE)
    assert result.exit_code == 0, result.output
    assert "wrote 16 pages for 11 adapters" in result.output  # home, 11 adapters, 4 tasks
    return out


# -- the site: valid HTML, every internal link resolves --------------------------------------------

def _internal_links(page: Path, document) -> list[tuple[str, str]]:
    """(href, where it points) of every link and asset on a page that stays inside the site."""
    links = []
    for element in document.iter():
        for attribute in ("href", "src"):
            value = element.get(attribute)
            if value is None or urlsplit(value).scheme in ("http", "https", "mailto"):
                continue
            links.append((value, str(page.parent / unquote(urlsplit(value).path)) if urlsplit(value).path else str(page)))
    return links


def test_every_page_is_valid_html_and_every_internal_link_resolves(site: Path, index: Path) -> None:
    import html5lib

    pages = sorted(site.rglob("*.html"))
    assert len(pages) == 16
    ids: dict[Path, set[str]] = {}
    documents = {}
    for page in pages:
        parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False)
        documents[page] = parser.parse(page.read_bytes())  # strict: raises on any parse error
        found = [e.get("id") for e in documents[page].iter() if e.get("id")]
        assert len(found) == len(set(found)), f"{page}: an id is used twice"
        ids[page.resolve()] = set(found)
    assert (site / "assets/style.css").is_file() and (site / "assets/explore.js").is_file()
    checked = 0
    for page, document in documents.items():
        for href, target in _internal_links(page, document):
            path = Path(os.path.normpath(target))
            assert path.is_file() and site.resolve() in path.resolve().parents, f"{page.name}: broken link {href}"
            fragment = urlsplit(href).fragment
            assert not fragment or fragment in ids.get(path.resolve(), set()), f"{page.name}: broken anchor {href}"
            checked += 1
    assert checked > 200
    home = (site / "index.html").read_text()
    for d in descriptors(index):  # every adapter is listed on the home page, linked to its own page
        assert home.count(f'href="adapters/{slug_of(d)}.html"') == 1
    assert "https://" not in home and "http://" not in home  # nothing is fetched at view time


def test_an_adapter_page_shows_what_the_issue_lists(site: Path, index: Path, runs: dict[str, Path]) -> None:
    (descriptor,) = [d for d in descriptors(index) if d.id == "sentiment/movies@me" and d.method == "lora"]
    page = (site / "adapters" / f"sentiment--movies--me--{descriptor.path.stem}.html").read_text()
    text = re.sub(r"<[^>]+>", "", page)
    assert f'model.load_adapter(&#34;sentiment/movies@me&#34;, index=&#34;{index.resolve()}&#34;, method=&#34;lora&#34;' in page
    assert "load: sentiment/movies@me" in text and f"adapter hub show sentiment/movies@me --index {index.resolve()}" in text
    for name, digest in descriptor.files["sha256"].items():  # files, their sha256 and where they live
        assert name in text and digest in text
    assert f"{descriptor.parameters['adapter']:,} in the adapter" in text and descriptor.parameters["adapter"] > 0
    accuracy = descriptor.metrics["accuracy"]
    assert f"{accuracy:.4f}" in text and "validation split" in text  # the metrics, with the card's split
    assert "r: " in text and "alpha: " in text  # the method's config
    assert "## Recipe" not in page and "<h2>Recipe</h2>" in page  # the card, as HTML
    comparison = (site / "tasks/sentiment.html").read_text()
    assert "<svg" in comparison and comparison.count("<circle") >= 6 and "accuracy against size" in comparison


# -- the browser -----------------------------------------------------------------------------------

def _browser() -> tuple[str, str] | None:
    """(Chromium, its driver): $ADAPTERCLI_CHROMIUM / $ADAPTERCLI_CHROMEDRIVER, or found on PATH."""
    binary = os.environ.get("ADAPTERCLI_CHROMIUM") or next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = os.environ.get("ADAPTERCLI_CHROMEDRIVER") or shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture(scope="module")
def browser():
    found = _browser()
    if found is None:
        pytest.skip("no Chromium with its driver here: `make install` installs Debian's chromium and "
                    "chromium-driver (or set ADAPTERCLI_CHROMIUM and ADAPTERCLI_CHROMEDRIVER)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed (the dev extra has it; run make install)")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="adaptercli-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shown_rows(driver) -> list[tuple[str, str, str]]:
    """(id, base model, method) of the rows the page shows."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")
    return sorted((r.get_attribute("data-text").split()[0], r.get_attribute("data-model"), r.get_attribute("data-method"))
                  for r in rows if r.is_displayed())


def expected_rows(index: Path, **filters: str) -> list[tuple[str, str, str]]:
    return sorted((d.id, d.model["name"], d.method) for d in search(descriptors(index), **filters))


def save_screenshots(driver, index: Path, folder: Path) -> None:
    """docs/screenshots: the home page filtered by task, and an adapter page, of the site as it
    would be published (its load lines naming the index by a Hub data set id)."""
    from selenium.webdriver.common.by import By

    site = folder / "published"
    result = runner.invoke(app, ["hub", "site", "--index", str(index), "--out", str(site), "--index-url",
                                 "hf:datasets/you/adapter-index"], env=OFFLINE)
    assert result.exit_code == 0, result.output
    Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
    page = next((site / "adapters").glob("sentiment--movies--me--*_lora.html"))
    for url, name in (((site / "index.html").as_uri() + "?task=sentiment", "explore-home.png"),
                      (page.as_uri(), "explore-adapter.png")):
        driver.get(url)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(height + 160, 3200))  # the window's frame takes some of it
        assert driver.find_element(By.TAG_NAME, "footer").is_displayed()
        driver.save_screenshot(str(Path(SCREENSHOTS) / name))
    driver.set_window_size(1280, 900)


def test_browser_filters_by_task_then_method_and_the_load_line_gives_the_runs_predictions(
        browser, site: Path, index: Path, runs: dict[str, Path], hub_env: dict, tiny_bert_dir: Path,
        tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from adaptercli.inference import predict

    browser.get((site / "index.html").as_uri())
    assert len(shown_rows(browser)) == 11 and browser.find_element(By.ID, "shown").text == "11"
    Select(browser.find_element(By.ID, "filter-task")).select_by_value("sentiment")
    assert shown_rows(browser) == expected_rows(index, task="sentiment") and len(shown_rows(browser)) == 6
    Select(browser.find_element(By.ID, "filter-method")).select_by_value("lora")
    assert shown_rows(browser) == expected_rows(index, task="sentiment", method="lora") == [
        ("sentiment/imdb@me", OTHER, "lora"), ("sentiment/movies@me", BASE, "lora")]
    assert browser.find_element(By.ID, "shown").text == "2"
    assert urlsplit(browser.current_url).query == "task=sentiment&method=lora"  # the view, in the URL
    options = browser.find_element(By.ID, "filter-task").text  # each option counts what it would leave
    assert "nli (1)" in options and "spam (0)" in options and "sentiment (2)" in options

    # The URL parameters alone give the same view; the search narrows it by text.
    browser.get((site / "index.html").as_uri() + "?task=sentiment&method=lora&q=imdb")
    assert shown_rows(browser) == [("sentiment/imdb@me", OTHER, "lora")]
    browser.get((site / "index.html").as_uri() + "?task=sentiment&method=lora")
    row = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")
               if r.get_attribute("data-model") == BASE and r.is_displayed())
    row.find_element(By.CSS_SELECTOR, "a.adapter-link").click()
    assert browser.find_element(By.ID, "adapter-id").text == "sentiment/movies@me"
    line = browser.find_element(By.ID, "load-python").text

    # The line the page shows, run as it is: the run's logits and the run's predicted labels.
    assert 'method="lora"' in line and f'from_pretrained("{BASE}")' in line
    logits = run_lines(line, hub_env, tiny_bert_dir)
    assert torch.allclose(logits, run_logits(runs["lora"]), atol=1e-5)
    labels = [p["label"] for p in predict(runs["lora"], TEXTS)]
    head = next(d.head for d in descriptors(index) if d.id == "sentiment/movies@me" and d.method == "lora")
    assert [head["labels"][i] for i in logits.argmax(-1).tolist()] == labels
    if SCREENSHOTS:
        save_screenshots(browser, index, tmp_path)


# -- publishing: a git index on 127.0.0.1, a Hub index ---------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def git_daemon(tmp_path: Path):
    """A bare, empty repository ``index.git`` served by `git daemon` on 127.0.0.1 (pushes allowed)."""
    root = tmp_path / "served"
    subprocess.run(["git", "init", "--quiet", "--bare", "-b", "main", str(root / "index.git")], check=True)
    port = _free_port()
    daemon = subprocess.Popen(["git", "daemon", "--reuseaddr", f"--base-path={root}", "--export-all",
                               "--enable=receive-pack", "--listen=127.0.0.1", f"--port={port}", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"git://127.0.0.1:{port}/index.git", root / "index.git"
    finally:
        daemon.terminate()
        daemon.wait(10)


def test_hub_add_to_a_git_index_on_127_0_0_1_then_load_by_id(runs: dict[str, Path], git_daemon, tmp_path: Path,
                                                           tiny_bert_dir: Path, monkeypatch) -> None:
    url, bare = git_daemon
    env = {**OFFLINE, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # where indexes are cloned to be read
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    add = ["--index", url, "--task", "sentiment", "--dataset", "movies", "--org", "me", "--base-model", BASE]
    for method, run in runs.items():  # the first push makes the empty repository's first commit
        added = runner.invoke(app, ["hub", "add", str(run), *add], env=env)
        assert added.exit_code == 0, added.output
        assert f"added sentiment/movies@me ({method} on {BASE}) to sentiment/movies/me/" in added.output
    log = subprocess.run(["git", "--git-dir", str(bare), "log", "--format=%s", "main"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert log == [f"Add sentiment/movies@me (seq_bn on {BASE})", f"Add sentiment/movies@me (lora on {BASE})"]
    again = runner.invoke(app, ["hub", "add", str(runs["lora"]), *add], env=env)
    assert again.exit_code == 1 and "exists" in again.output and "--force" in again.output
    validated = runner.invoke(app, ["hub", "validate", url], env=env)
    assert validated.exit_code == 0 and "2 descriptors, 8 files checked" in validated.output, validated.output
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    for method, run in runs.items():
        model = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)
        model.load_adapter("sentiment/movies@me", index=url, method=method, set_active=True)
        model.eval()
        with torch.no_grad():
            logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
        assert torch.allclose(logits, run_logits(run), atol=1e-5)


def test_hub_add_to_a_hub_index_then_load_by_id(runs: dict[str, Path], hub: HubServer, hub_env: dict,
                                                tiny_bert_dir: Path) -> None:
    from huggingface_hub import HfApi

    spec = "hf:datasets/tester/explore-index"
    added = cli("hub", "add", str(runs["lora"]), "--index", spec, "--task", "sentiment", "--dataset", "movies", "--org",
                "me", "--base-model", BASE, env=hub_env)
    assert added.returncode == 0, added.stderr
    files = HfApi(endpoint=hub.endpoint, token=hub.token).list_repo_files("tester/explore-index", repo_type="dataset")
    stem = f"sentiment/movies/me/{BASE.replace('/', '--')}_lora"
    assert {f"{stem}.yaml", f"{stem}/adapter.safetensors", f"{stem}/README.md"} <= set(files)
    again = cli("hub", "add", str(runs["lora"]), "--index", spec, "--task", "sentiment", "--dataset", "movies", "--org",
                "me", "--base-model", BASE, env=hub_env)
    assert again.returncode == 1 and f"{stem}.yaml exists" in again.stderr
    validated = cli("hub", "validate", spec, env=hub_env)
    assert validated.returncode == 0 and "1 descriptor, 4 files checked" in validated.stdout, validated.stderr
    lines = (f"import adaptercli\nmodel = adaptercli.AutoAdapterModel.from_pretrained({BASE!r})\n"
             f"model.load_adapter('sentiment/movies@me', index={spec!r}, set_active=True)\nmodel.eval()")
    assert torch.allclose(run_lines(lines, hub_env, tiny_bert_dir), run_logits(runs["lora"]), atol=1e-5)


# -- a broken index: every fault, one line each; no site --------------------------------------------

def _edit(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_validate_reports_every_fault_of_a_bad_index_in_one_line_each(index: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(index, bad)
    by_method = {d.method: d.path for d in descriptors(bad) if d.method in
                 ("seq_bn", "ia3", "prefix_tuning", "par_bn", "loreft", "dora", "prompt_tuning", "double_seq_bn")}
    _edit(by_method["seq_bn"], lambda d: d.pop("method"))                                     # a missing field
    _edit(by_method["ia3"], lambda d: d["model"].update(hidden_size="big"))                   # a wrong type
    weights = by_method["prefix_tuning"].with_suffix("") / "adapter.safetensors"               # a bad sha256
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    (by_method["par_bn"].with_suffix("") / "head_config.json").unlink()                       # a missing file
    duplicate = by_method["loreft"].with_name("zz_copy.yaml")                          # a duplicate id
    shutil.copyfile(by_method["loreft"], duplicate)
    _edit(by_method["dora"], lambda d: d["model"].update(name="/home/me/models/bert"))        # not a Hub id
    _edit(by_method["prompt_tuning"], lambda d: d.update(method="prompt_tunning"))            # an unknown method
    _edit(by_method["double_seq_bn"], lambda d: d["files"]["sha256"].update({"adapter.safetensors": "abc"}))
    (bad / "sentiment/movies/broken.yaml").write_text("task: sentiment\nmodel: [unclosed\n")   # not YAML
    rel = {k: v.relative_to(bad).as_posix() for k, v in by_method.items()}
    expected = [
        f"{rel['seq_bn']}: method: missing",
        f"{rel['ia3']}: model.hidden_size: expected an integer, got text 'big'",
        f"{rel['prefix_tuning']}: files.sha256[adapter.safetensors]: ",
        f"{rel['par_bn']}: files.sha256[head_config.json]: head_config.json is missing from ",
        f"{duplicate.relative_to(bad).as_posix()}: id: nli/mnli@me with loreft on {OTHER} is also described by {rel['loreft']}",
        f"{rel['dora']}: model.name: text '/home/me/models/bert' is not a Hub id",
        f"{rel['prompt_tuning']}: method: unknown adapter method 'prompt_tunning', did you mean prompt_tuning?",
        f"{rel['double_seq_bn']}: files.sha256[adapter.safetensors]: expected 64 hexadecimal digits, got text 'abc'",
        "sentiment/movies/broken.yaml: (YAML): not valid YAML (line 3, column 1",
    ]
    result = runner.invoke(app, ["hub", "validate", str(bad)], env=OFFLINE)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(lines) == len(expected), result.output  # one line per fault, nothing else
    for want in expected:
        assert sum(line.startswith(f"error: {want}") for line in lines) == 1, (want, result.output)

    # `site` refuses it with the same lines, and leaves a site already there as it was.
    out = tmp_path / "site"
    assert runner.invoke(app, ["hub", "site", "--index", str(index), "--out", str(out)], env=OFFLINE).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = runner.invoke(app, ["hub", "site", "--index", str(bad), "--out", str(out)], env=OFFLINE)
    assert refused.exit_code == 1 and refused.output.strip().splitlines() == lines
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "site"]  # no half-written folder beside it


def test_site_replaces_its_own_site_and_refuses_other_folders(index: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["hub", "site", "--index", str(index), "--out", str(out)], env=OFFLINE)
    assert refused.exit_code == 1 and "did not write" in refused.output and (out / "notes.txt").read_text() == "mine"
    site = tmp_path / "site"
    for _ in range(2):  # the second run replaces the first
        result = runner.invoke(app, ["hub", "site", "--index", str(index), "--out", str(site), "--index-url",
                                     "hf:datasets/you/adapter-index"], env=OFFLINE)
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "site"]
    page = next((site / "adapters").glob("nli--rte--lab--*_par_bn.html")).read_text()
    assert 'index=&#34;hf:datasets/you/adapter-index&#34;' in page and 'method=&#34;par_bn&#34;' in page


def test_a_git_index_that_moved_meanwhile_gets_the_commit_rebased_onto_it(runs: dict[str, Path], tmp_path: Path,
                                                                          monkeypatch) -> None:
    """Someone pushes to the index (a bare repository over file://) while `hub add` writes its descriptor."""
    from adaptercli import publish

    def git(*args: str, cwd: Path | None = None) -> str:
        command = ["git", "-c", "user.name=someone", "-c", "user.email=someone@localhost", *args]
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True).stdout

    bare = tmp_path / "index.git"
    git("init", "--quiet", "--bare", "-b", "main", str(bare))
    other = tmp_path / "someone"
    git("clone", "--quiet", bare.as_uri(), str(other))
    (other / "README.md").write_text("# our adapters\n")
    git("add", ".", cwd=other)
    git("commit", "--quiet", "-m", "readme", cwd=other)
    git("push", "--quiet", "origin", "HEAD", cwd=other)
    writing = publish.add_to_index

    def racing(*args, **kwargs):
        written = writing(*args, **kwargs)
        (other / "NOTES.md").write_text("pushed meanwhile\n")
        git("add", ".", cwd=other)
        git("commit", "--quiet", "-m", "notes", cwd=other)
        git("push", "--quiet", "origin", "HEAD", cwd=other)
        return written

    monkeypatch.setattr(publish, "add_to_index", racing)
    source = open_source(runs["lora"], base_model=BASE, task="sentiment", dataset="movies")
    published = publish.publish(bare.as_uri(), source, org="me")
    assert git("--git-dir", str(bare), "log", "--format=%s", "main").splitlines() == [
        f"Add sentiment/movies@me (lora on {BASE})", "notes", "readme"]
    assert published.commit == git("--git-dir", str(bare), "rev-parse", "main").strip()
    assert published.path == f"sentiment/movies/me/{BASE.replace('/', '--')}_lora.yaml"


@pytest.mark.parametrize("command", [["hub", "site"], ["hub", "validate"], ["hub", "add"]])
def test_the_new_commands_have_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
