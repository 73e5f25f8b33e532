"""Build varied chat prompts from real text that installs offline, for self-distillation (issue 16, item 7).

The template prompts (medusa_gguf/prompts/train.jsonl) all share a few hundred phrasings, so heads trained on
the model's answers to them lose accuracy on what users really send. These prompts wrap real passages, code,
quotations and dictionary entries from Debian 12 packages in many kinds of request. Install them with

    apt-get install -y --no-install-recommends python3-doc manpages manpages-dev groff-base wordnet-base \
        wamerican fortunes

then run (standard library only; same packages and seed, same file byte for byte):

    python scripts/corpus_prompts.py                      # writes medusa_gguf/prompts/corpus_prompts.jsonl
    python scripts/corpus_prompts.py --out /tmp/p.jsonl --seed 1

Sources, each tagged in the `source` field ("<source>:<document>"):
- python-docs: the Python 3.11 documentation's reStructuredText sources (python3-doc): prose passages, code
  examples and section titles of the tutorial, HOWTOs, FAQ, language reference and library reference.
- man: the Linux man-pages project's pages (manpages, manpages-dev), rendered to text by groff (groff-base):
  passages from DESCRIPTION/NOTES, EXAMPLES code, and NAME lines.
- wordnet: WordNet 3.0 (wordnet-base) entries whose lemma is also in the wamerican word list and was seen in
  WordNet's sense-tagged corpus (a common word): definitions, example sentences, hypernyms, antonyms.
- fortunes: quotations, jokes and verse from fortune-mod's non-offensive collections (fortunes).

Each line is {"id", "prompt", "source", "kind"}; `id` is the first 16 hex digits of the prompt's SHA-256, so
a prompt keeps its id whatever else changes. Prompts are deduplicated (case and spacing ignored), each
passage is used once, and any prompt sharing a run of five words with medusa_gguf/prompts/unseen.jsonl (the
hand-written held-out set, a different source) is dropped, so the held-out prompts stay unseen.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "medusa_gguf" / "prompts" / "corpus_prompts.jsonl"
UNSEEN = ROOT / "medusa_gguf" / "prompts" / "unseen.jsonl"

PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
WORDNET = Path("/usr/share/wordnet")
WORDS = Path("/usr/share/dict/american-english")
FORTUNES = Path("/usr/share/games/fortunes")
MAN_PACKAGES = ("manpages", "manpages-dev")
# fortune-mod's collections without slurs, politics or drugs; ascii-art is pictures, not text.
FORTUNE_FILES = ("art", "computers", "education", "food", "fortunes", "goedel", "humorists", "kids", "law", "linux",
                 "literature", "love", "magic", "medicine", "miscellaneous", "paradoxum", "people", "pets",
                 "platitudes", "riddles", "science", "songs-poems", "sports", "wisdom", "work")
INSTALL = ("apt-get install -y --no-install-recommends python3-doc manpages manpages-dev groff-base wordnet-base "
           "wamerican fortunes")
# Prompts per source; about 4,000 in all keeps the committed file under 2 MB.
DEFAULT_COUNTS = {"python-docs": 1200, "man": 1000, "wordnet": 1200, "fortunes": 600}
MIN_WORDS, MAX_WORDS = 25, 110  # passage length: enough to work on, short enough for a 135M model's context


class MissingSource(RuntimeError):
    """A Debian package the prompts come from is not installed; the message names it and the install command."""


@dataclass(frozen=True)
class Passage:
    source: str  # "<source>:<document>"
    title: str  # section title, command name or author; "" when none
    text: str
    code: bool = False  # a code example rather than prose


@dataclass(frozen=True)
class Entry:
    """One WordNet sense of a common word."""

    word: str
    pos: str  # noun, verb, adjective, adverb
    definition: str
    examples: tuple[str, ...]
    related: tuple[str, ...]  # lemmas of its hypernyms
    antonyms: tuple[str, ...]


def require(path: Path, package: str) -> None:
    if not path.exists():
        raise MissingSource(f"{path} is missing: install the Debian package {package} ({INSTALL})")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def clip(paragraphs: list[str]) -> str:
    """Consecutive paragraphs up to MAX_WORDS words; "" when even the first is too long or all are too short."""
    kept: list[str] = []
    n = 0
    for p in paragraphs:
        m = len(p.split())
        if n + m > MAX_WORDS:
            break
        kept.append(p)
        n += m
    return "\n\n".join(kept) if n >= MIN_WORDS else ""


# -- python-docs -------------------------------------------------------------------------------------------------

_ROLE = re.compile(r":[a-z:]+:`!?~?([^`<]*?)\s*(?:<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_HEADING = re.compile(r"^([=\-~^*#\"'+.])\1{3,}\s*$")


def rst_inline(text: str) -> str:
    text = _ROLE.sub(lambda m: f"`{m[1].strip()}`", text)
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*", r"\1", text)
    text = re.sub(r"`([^`]+)`_+", r"\1", text)
    text = re.sub(r"\|[\w-]+\|", "", text)
    return re.sub(r"\s+", " ", text).strip()


def rst_sections(lines: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """(title, prose paragraphs, code blocks) per section of one reStructuredText file; directives are skipped."""
    sections: list[tuple[str, list[str], list[str]]] = [("", [], [])]
    i = 0
    while i < len(lines):
        line = lines[i]
        if _HEADING.match(line) and i + 2 < len(lines) and _HEADING.match(lines[i + 2]):  # overlined title
            sections.append((rst_inline(lines[i + 1]), [], []))
            i += 3
            continue
        if line.strip() and i + 1 < len(lines) and _HEADING.match(lines[i + 1]) and not line.startswith(" "):
            sections.append((rst_inline(line), [], []))
            i += 2
            continue
        if line.startswith(".. "):  # a directive or comment and its indented body
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                i += 1
            continue
        if not line.strip():
            i += 1
            continue
        block = []
        indented = line.startswith(" ")
        while i < len(lines) and lines[i].strip() and lines[i].startswith(" ") == indented:
            block.append(lines[i])
            i += 1
        title, prose, code = sections[-1]
        if indented:
            body = "\n".join(block)
            if len(body) < 700 and (">>>" in body or re.search(r"^\s+(def|class|import|for) ", body, re.M)):
                code.append(_dedent(block))
            continue
        text = " ".join(b.strip() for b in block)
        if text.startswith(("* ", "- ", "#. ", "|", "+")) or re.match(r"\d+\. ", text):
            continue
        prose.append(rst_inline(text[:-1] if text.endswith("::") else text))
    return [s for s in sections if s[0] or s[1]]


def _dedent(block: list[str]) -> str:
    pad = min(len(b) - len(b.lstrip()) for b in block if b.strip())
    return "\n".join(b[pad:] for b in block)


def python_docs() -> list[Passage]:
    require(PY_DOCS, "python3-doc")
    out: list[Passage] = []
    for path in sorted(PY_DOCS.rglob("*.rst.txt")):
        rel = path.relative_to(PY_DOCS).as_posix().removesuffix(".rst.txt")
        if rel.startswith(("whatsnew", "c-api", "distutils", "includes")) or rel.endswith(("index", "license")):
            continue
        for title, prose, code in rst_sections(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            src = f"python-docs:{rel}"
            prose = [p for p in prose if len(p.split()) >= 8 and "`" not in p[:1]]
            for start in range(0, len(prose), 3):
                text = clip(prose[start : start + 3])
                if text:
                    out.append(Passage(src, title, text))
            out.extend(Passage(src, title, c, code=True) for c in code if 2 <= c.count("\n") <= 20)
    return out


# -- man pages ---------------------------------------------------------------------------------------------------


def man_files() -> list[Path]:
    try:
        listed = subprocess.run(["dpkg", "-L", *MAN_PACKAGES], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise MissingSource(f"cannot list the files of {' and '.join(MAN_PACKAGES)}: install them ({INSTALL})") from None
    files = sorted({Path(p) for p in listed.split() if re.match(r"/usr/share/man/man\d/.+\.gz$", p)})
    return [f for f in files if f.is_file() and not gzip.open(f, "rt", errors="replace").read(4).startswith(".so")]


def render_man(path: Path) -> str:
    """A page as plain text: paragraphs on one line each (very long lines, no hyphenation), no overstriking."""
    try:
        roff = gzip.open(path, "rb").read()
        proc = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-rLL=3000n", "-rHY=0", "-P-cbou"], input=roff,
                              capture_output=True, check=True)
    except FileNotFoundError:
        raise MissingSource(f"groff is missing: install the Debian package groff-base ({INSTALL})") from None
    return proc.stdout.decode("utf-8", errors="replace").replace("\u2010", "-").replace("\u2212", "-")


def man_passages(path: Path) -> list[Passage]:
    text = render_man(path)
    name = path.name.removesuffix(".gz")
    src = f"man:{name}"
    section, out, prose, code = "", [], [], []
    summary = ""
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section = line.strip()
            continue
        body = re.sub(r"\s+", " ", line).strip()
        indent = len(line) - len(line.lstrip())
        if section == "NAME" and body and not summary:
            summary = body
        elif section in ("DESCRIPTION", "NOTES", "BUGS") and indent == 7 and len(body.split()) >= 8:
            prose.append(body)
        elif section == "EXAMPLES" and indent >= 7:
            code.append(line[7:].rstrip() if line.strip() else "")
    if summary:
        out.append(Passage(src, summary, summary))
    for start in range(0, len(prose), 3):
        chunk = clip(prose[start : start + 3])
        if chunk:
            out.append(Passage(src, summary, chunk))
    example = "\n".join(code).strip("\n")
    if 3 <= example.count("\n") <= 25 and len(example) < 1200:
        out.append(Passage(src, summary, example, code=True))
    return out


def man_pages(rng: random.Random, pages: int) -> list[Passage]:
    files = man_files()
    rng.shuffle(files)
    out: list[Passage] = []
    for f in files[:pages]:
        out.extend(man_passages(f))
    return out


# -- wordnet -----------------------------------------------------------------------------------------------------

POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
POS_NAME = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def wordnet_entries() -> list[Entry]:
    """The most frequent sense of each common single-word lemma (sense-tagged at least twice, in wamerican)."""
    require(WORDNET / "data.noun", "wordnet-base")
    require(WORDS, "wamerican")
    vocab = set(WORDS.read_text(encoding="utf-8", errors="replace").split())
    entries: list[Entry] = []
    for pos in POS:
        synsets: dict[str, str] = {}
        for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line[:1].isdigit():
                synsets[line[:8]] = line
        for line in (WORDNET / f"index.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith(" "):
                continue
            f = line.split()
            lemma, n_ptr = f[0], int(f[3])
            tagged = int(f[5 + n_ptr])
            if tagged < 2 or lemma not in vocab or not lemma.isalpha() or len(lemma) < 3:
                continue
            entries.append(_entry(lemma, pos, synsets[f[6 + n_ptr]], synsets, vocab))
    return entries


def _entry(lemma: str, pos: str, line: str, synsets: dict[str, str], vocab: set[str]) -> Entry:
    head, _, gloss = line.partition(" | ")
    f = head.split()
    n_words = int(f[3], 16)
    n_ptr = int(f[4 + 2 * n_words])
    ptrs = [f[5 + 2 * n_words + 4 * k : 9 + 2 * n_words + 4 * k] for k in range(n_ptr)]
    parts = [p.strip() for p in gloss.strip().split(";")]
    definition = next((p for p in parts if not p.startswith('"')), "")
    examples = tuple(p.strip('"') for p in parts if p.startswith('"') and lemma in p.lower())

    def lemmas(symbol: str) -> tuple[str, ...]:
        found = []
        for sym, off, p, _ in ptrs:
            if sym == symbol and p == POS[pos] and off in synsets:
                g = synsets[off].split()
                found += [re.sub(r"\(.*\)", "", w) for w in g[4 : 4 + 2 * int(g[3], 16) : 2]]
        return tuple(w for w in dict.fromkeys(found) if w in vocab and w != lemma)

    return Entry(lemma, POS_NAME[pos], definition, examples, lemmas("@"), lemmas("!"))


# -- fortunes ----------------------------------------------------------------------------------------------------


def fortunes() -> list[Passage]:
    require(FORTUNES / "fortunes", "fortunes")
    out = []
    for name in FORTUNE_FILES:
        for raw in (FORTUNES / name).read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = "\n".join(line.replace("\t", "    ").rstrip() for line in raw.strip("\n%").splitlines()).strip()
            letters = sum(c.isalpha() for c in text)
            if 60 <= len(text) <= 600 and letters > 0.6 * len(text) and len(text.splitlines()) <= 14:
                author = re.search(r"^\s*--\s*(.+)$", text, re.M)
                out.append(Passage(f"fortunes:{name}", author[1].strip() if author else "", text))
    return out


# -- instructions ------------------------------------------------------------------------------------------------

# Prose passages. {t} is the passage, {title} its section or page; several wordings per kind of task.
PROSE = {
    "summarise": ["Summarize this in two sentences:\n\n{t}", "Give me a one-sentence summary of the following.\n\n{t}",
                  "{t}\n\nCan you sum that up briefly?", "tl;dr please:\n\n{t}",
                  "Here is a paragraph from some documentation:\n\"{t}\"\nWhat is the gist of it?"],
    "explain": ["Explain what this passage means, in plain words:\n\n{t}", "{t}\n\nI don't quite get this. Could you explain it?",
                "Can you walk me through this text step by step?\n\n---\n{t}\n---",
                "Explain the following to someone who has never programmed:\n\n{t}"],
    "simplify": ["Rewrite this in simple English that a 12-year-old could follow:\n\n{t}",
                 "{t}\n\nSay the same thing in simpler words, please.", "Translate this into plain, simple English:\n\n{t}"],
    "questions": ["Write three quiz questions (with answers) that test understanding of this text:\n\n{t}",
                  "{t}\n\nWhat questions might a beginner ask after reading this? List a few and answer them.",
                  "Make two multiple-choice questions from this passage:\n\n{t}"],
    "list": ["List the key points of this text as bullet points:\n\n{t}", "{t}\n\nBreak that down into a short numbered list.",
             "Pull out every concrete fact from the following and list them:\n\n{t}"],
    "rewrite": ["Rewrite this paragraph in a friendlier, more conversational tone:\n\n{t}",
                "Turn this into a short, punchy blog intro:\n\n{t}", "{t}\n\nRewrite that more concisely.",
                "Rephrase the following without changing its meaning:\n\n{t}"],
    "continue": ["Continue this text with one more paragraph in the same style:\n\n{t}",
                 "{t}\n\nWhat would a sensible next paragraph say? Write it."],
    "title": ["Suggest three good titles for this passage:\n\n{t}", "{t}\n\nGive this section a short heading."],
    "critique": ["Is anything in this explanation unclear or missing? Suggest improvements.\n\n{t}",
                 "{t}\n\nHow could this paragraph be made easier to read?"],
    "ask": ["According to the text below, why does this matter in practice?\n\n{t}",
            "{t}\n\nGive a real-world example of what this describes.", "Read this and tell me when I would need it:\n\n{t}"],
}
CODE = {
    "explain-code": ["What does this code do?\n\n```\n{t}\n```", "```\n{t}\n```\nExplain this line by line.",
                     "Can you explain this example from the {title} docs?\n\n{t}"],
    "predict": ["What will this print, and why?\n\n```\n{t}\n```"],
    "comment": ["Add helpful comments to this code:\n\n```\n{t}\n```", "```\n{t}\n```\nRewrite it with clearer names and comments."],
    "vary": ["Here is an example:\n\n```\n{t}\n```\nShow a small variation of it and explain the change.",
             "```\n{t}\n```\nWhat could go wrong with this, and how would you make it more robust?"],
}
PY_TOPIC = ["Explain \"{title}\" in Python with a short example.", "quick question: {title_l} in python, how does that work? keep it short",
            "I'm learning Python. What should I know about {title_l}?", "Give me a quick cheat sheet for {title_l} in Python."]
MAN_TOPIC = ["What is {name} used for? ({desc})", "Show me a typical use of `{name}` on Linux and explain it.",
             "In one paragraph: {name} - {desc}. When would I use it?", "What are common mistakes when using {name}?"]
QUOTE = {
    "explain-quote": ["What does this quote mean?\n\n{t}", "{t}\n\nExplain the idea behind this.",
                      "Someone posted this:\n\n{t}\n\nWhat's the point they are making?"],
    "joke": ["Explain why this is supposed to be funny:\n\n{t}", "{t}\n\nI don't get it. What's the joke?"],
    "respond": ["Do you agree with this? Argue both sides briefly.\n\n{t}", "{t}\n\nWrite a witty reply to this."],
    "inspire": ["Write a short story (under 150 words) inspired by this:\n\n{t}", "Turn this into a four-line poem:\n\n{t}",
                "{t}\n\nRewrite this in modern everyday language."],
}
WORD = {
    "meaning": ["What does the word \"{w}\" mean? Give an example sentence.", "meaning of {w}?",
                "Define \"{w}\" ({pos}) in simple terms."],
    "sentences": ["Write three sentences that use \"{w}\" as a {pos}.", "Use the word {w} in a short paragraph about everyday life."],
    "reverse": ["What's a single English word that means \"{d}\"?", "Which word am I thinking of? It's a {pos} meaning: {d}."],
    "in-context": ["In the sentence \"{e}\", what does \"{w}\" mean?", "\"{e}\" - is {w} used correctly here? Explain."],
    "difference": ["What's the difference between \"{w}\" and \"{r}\"?", "{w} vs {r}: how are they related?"],
    "opposite": ["What's the opposite of \"{w}\"? Use both words in a sentence.", "Give an antonym of {w} and explain the contrast."],
    "child": ["How would you explain the word \"{w}\" to a seven-year-old?"],
    "synonyms": ["Give me some synonyms for \"{w}\" and say how they differ.", "Other ways to say {w}?"],
    "story": ["Write a short story (under 150 words) that uses the words {w}, {w2} and {w3}.",
              "Make up a riddle whose answer is \"{w}\"."],
}


def good_topic(p: Passage) -> bool:
    """A man page's NAME line, or a short plain section title ("Lambda Expressions", not "Example 6: ...")."""
    if p.source.startswith("man:"):
        return " - " in p.title
    return (bool(re.fullmatch(r"[A-Za-z][A-Za-z' -]{3,40}", p.title)) and 2 <= len(p.title.split()) <= 5
            and not re.search(r"\b(introduction|examples?|recipes?|notes?|overview|summary|details|other|usage|"
                              r"contents|objects|functions|methods|reference|changes|more|see also)$", p.title.lower()))


def passage_prompt(rng: random.Random, p: Passage, kinds: dict[str, list[str]]) -> tuple[str, str]:
    kind = rng.choice(sorted(kinds))
    return kind, rng.choice(kinds[kind]).format(t=p.text, title=p.title or "this")


def topic_prompt(rng: random.Random, p: Passage) -> tuple[str, str]:
    if p.source.startswith("man:"):
        name, _, desc = p.title.partition(" - ")
        return "topic", rng.choice(MAN_TOPIC).format(name=name.split(",")[0].strip(), desc=desc or name)
    lower = " ".join(w if w.isupper() and len(w) > 1 else w.lower() for w in p.title.split())  # keep "CSV", "HTTP"
    return "topic", rng.choice(PY_TOPIC).format(title=p.title, title_l=lower)


def word_prompt(rng: random.Random, e: Entry, pool: list[Entry]) -> tuple[str, str]:
    kinds = ["meaning", "sentences", "reverse", "child", "synonyms", "story"]
    kinds += ["in-context"] * bool(e.examples) + ["difference"] * bool(e.related) + ["opposite"] * bool(e.antonyms)
    kind = rng.choice(kinds)
    others = rng.sample(pool, 2)
    values = dict(w=e.word, pos=e.pos, d=e.definition, e=e.examples[0] if e.examples else "",
                  r=e.related[0] if e.related else "", w2=others[0].word, w3=others[1].word)
    return kind, rng.choice(WORD[kind]).format(**values)


# -- the build ---------------------------------------------------------------------------------------------------


def five_grams(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + 5]) for i in range(len(w) - 4)}


def build(seed: int = 0, counts: dict[str, int] | None = None, unseen: Path = UNSEEN) -> list[dict[str, str]]:
    """The prompt rows, in a seeded shuffled order (a chunk of the corpus then mixes every source)."""
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    rng = random.Random(seed)
    banned: set[tuple[str, ...]] = set()
    if unseen.is_file():
        for line in unseen.read_text(encoding="utf-8").splitlines():
            banned |= five_grams(json.loads(line)["prompt"])
    seen: set[str] = set()
    rows: list[dict[str, str]] = []

    def add(source: str, kind: str, prompt: str) -> bool:
        key = " ".join(prompt.lower().split())
        if key in seen or five_grams(prompt) & banned:
            return False
        seen.add(key)
        rows.append({"id": hashlib.sha256(prompt.encode()).hexdigest()[:16], "prompt": prompt, "source": source,
                     "kind": kind})
        return True

    def from_passages(passages: list[Passage], want: int, prose: dict[str, list[str]], topic_share: float) -> None:
        rng.shuffle(passages)
        titles: set[str] = set()
        made = 0
        for p in passages:
            if made >= want:
                break
            if p.title not in titles and good_topic(p) and rng.random() < topic_share:
                titles.add(p.title)
                made += add(p.source, *topic_prompt(rng, p))
            if p.text == p.title:  # a man page's NAME line: only good for a topic question
                continue
            made += add(p.source, *passage_prompt(rng, p, CODE if p.code else prose))

    n = counts["python-docs"]
    if n:
        from_passages(python_docs(), n, PROSE, 0.12)
    n = counts["man"]
    if n:
        from_passages(man_pages(rng, pages=max(1, n // 2)), n, PROSE, 0.5)
    n = counts["fortunes"]
    if n:
        from_passages(fortunes(), n, QUOTE, 0.0)
    n = counts["wordnet"]
    if n:
        entries = wordnet_entries()
        rng.shuffle(entries)
        made = 0
        for e in entries:
            if made >= n:
                break
            made += add(f"wordnet:{e.pos}", *word_prompt(rng, e, entries))
    rng.shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="output JSONL (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="shuffling and choice of wordings (default: %(default)s)")
    for name, n in DEFAULT_COUNTS.items():
        ap.add_argument(f"--{name}", type=int, default=n, help=f"prompts from {name} (default: %(default)s)")
    args = ap.parse_args(argv)
    counts = {name: getattr(args, name.replace("-", "_")) for name in DEFAULT_COUNTS}
    try:
        rows = build(args.seed, counts)
    except MissingSource as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    by_source: dict[str, int] = {}
    for r in rows:
        by_source[r["source"].split(":")[0]] = by_source.get(r["source"].split(":")[0], 0) + 1
    print(f"{len(rows)} prompts ({', '.join(f'{k} {v}' for k, v in sorted(by_source.items()))}), "
          f"{args.out.stat().st_size:,} bytes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
