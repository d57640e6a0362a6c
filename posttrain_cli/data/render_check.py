"""Pre-flight: every row rendered with the chat template its stage will use, before anything trains.

A template may refuse a conversation (Gemma: "System role not supported" on a system turn; Llama 2,
Mistral, Cohere: roles that must alternate; gpt-oss: channel tags in the content). At tokenize time
that is a one-line error naming the file and row (data/chat.py render), but only once the stage
runs, hours of earlier stages later. The runner's pre-flight renders each row here instead, in
the same pass and worker processes as the row schema check (data/sources.py SourceRows), and
stops the run naming the file, the row and the template's own message.

Cost: rendering takes 30-700 us a row (Gemma's one-line template to Qwen 3.6's), several times the
schema check, so it is done only where it can fail, and once: a Hugging Face template refuses a
conversation by calling `raise_exception` (the one refusal transformers gives templates), and a
template without that call renders every conversation; only those with it are rendered here, once
per row (the whole conversation; a prompt row with its generation prompt; a preference row once per
answer), on every core. A source that rendered cleanly is remembered under RUN_DIR/_cache/rendered/
(its content, the template, the row schema), so running again (a resumed stage) does not pay twice.
The template is the one a stage's tokenizer gets (data/chat.py use_template):
model.chat_template, else the model's own, read from its directory or the hub cache without loading
the tokenizer; a hub model not downloaded yet is checked when its stage tokenizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain_cli.data.chat import _PROBE, _as_parts
from posttrain_cli.errors import UserError

# The call by which a Hugging Face chat template refuses a conversation.
REFUSAL = "raise_exception"
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class RowRender:
    """Renders the rows of one row schema with one template; raises UserError naming file, row and the
    template's message. Built in the parent process (the template compiled once), used in the forked
    workers as they check rows."""

    def __init__(self, template: str, tokens: dict, label: str, rows: str):
        from transformers.utils import chat_template_utils as ctu

        self.label, self.rows, self.tokens, self.template = label, rows, tokens, template
        compile_ = getattr(ctu, "_compile_jinja_template", None)
        if compile_ is not None:
            compiled = compile_(template)
            self._render = lambda messages, gen: compiled.render(messages=messages, add_generation_prompt=gen,
                                                                 **tokens)
        else:  # a transformers without the private compiler: the public renderer (twice the cost)
            self._render = lambda messages, gen: ctu.render_jinja_template(
                [messages], chat_template=template, add_generation_prompt=gen, **tokens)[0][0]
        self.parts = self._wants_parts()

    def _wants_parts(self) -> bool:
        """Multimodal templates read content as parts and render a plain string as nothing (data/chat.py)."""
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}]
        try:
            if _PROBE in self._render(probe, False):
                return False
        except Exception:  # noqa: BLE001 - a template that wants parts may fail on a string
            pass
        try:
            return _PROBE in self._render(_as_parts(probe), False)
        except Exception:  # noqa: BLE001 - neither form renders the probe: tokenizing will say so
            return False

    def conversations(self, row) -> list[tuple[list[dict], bool]]:
        """(messages, add_generation_prompt) a parsed row is rendered as when it is tokenized."""
        if self.rows == "sft":
            return [(row, False)]
        if self.rows == "preference":
            if row.get("drop") is not None:  # identical answers: dropped before tokenizing
                return []
            return [(row["prompt"] + [answer], False) for answer in row["responses"]]
        return [(row["messages"], True)]

    def __call__(self, row, src: str, n: int) -> None:
        from jinja2.exceptions import TemplateError

        for messages, gen in self.conversations(row):
            try:
                self._render(_as_parts(messages) if self.parts else messages, gen)
            except TemplateError as e:
                raise UserError(f"{src}: row {n}: model.chat_template: {self.label} cannot render this "
                                f"conversation ({e}); fix or drop the row, or set model.chat_template to a "
                                f"template that accepts it") from None
            except Exception:  # noqa: BLE001 - not a refusal: tokenizing reports it in its own words
                pass


# ------------------------------------------------------------------ which template a stage renders with


def _model_files(path: str, revision: str | None) -> Path | None:
    """A model's directory: local, or its snapshot in the hub cache (None: not downloaded)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        try:
            found = try_to_load_from_cache(path, name, revision=revision)
        except Exception:  # noqa: BLE001 - not a valid repo id, a broken cache: no pre-flight
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


def _read_template(folder: Path) -> tuple[str | None, dict]:
    """(the model's own chat template, its special tokens) from its tokenizer files."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    tokens = {}
    for key in _SPECIAL:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[key] = value
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        try:
            template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        except (OSError, ValueError):
            template = None
    else:
        template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return (template if isinstance(template, str) else None), tokens


def stage_template(run: dict, model: tuple | None) -> tuple[str, dict, str] | None:
    """(template, special tokens, how an error names it) that a stage whose model comes from `model`
    (("tiny", arch) | ("path", value), the root of its chain of stages) renders rows with; None when
    it cannot be known without downloading the model."""
    from posttrain_cli.data.chat import TEMPLATE_NAMES, template_text

    value = run["model"]["chat_template"]
    tokens: dict = {}
    own, where = None, None
    if model is not None and model[0] == "tiny":
        from posttrain_cli.models.tiny import CHAT_TEMPLATE

        own, tokens, where = CHAT_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}, "the tiny model"
    elif model is not None:
        folder = _model_files(model[1], run["model"].get("revision"))
        if folder is not None:
            own, tokens = _read_template(folder)
        where = model[1]
    if value is not None:
        name = value if value in TEMPLATE_NAMES or not ("{{" in value or "{%" in value) else "(inline)"
        return template_text(value), tokens, f"the chat template {name}"
    if own is None:
        return None
    return own, tokens, f"the chat template of {where}"


def row_render(run: dict, model: tuple | None, rows: str, cache: dict) -> RowRender | None:
    """The pre-flight render of a stage's rows, or None where its template cannot refuse a row (or is
    not known before the stage loads its model). `cache` keeps one per template and row schema."""
    found = stage_template(run, model)
    if found is None or REFUSAL not in found[0]:
        return None
    key = (found[0], json.dumps(found[1], sort_keys=True), rows)
    if key not in cache:
        cache[key] = RowRender(found[0], found[1], found[2], rows)
    return cache[key]


def verdict(run_dir: Path, signature: str, check: RowRender) -> Path:
    """The file that records that a source (its content `signature`) rendered cleanly with a check's
    template and row schema."""
    import hashlib

    try:
        from importlib.metadata import version

        jinja = version("jinja2")
    except Exception:  # noqa: BLE001 - not installed as a distribution: no version in the key
        jinja = None
    key = hashlib.sha256(json.dumps([signature, check.template, check.tokens, check.rows, check.parts, jinja],
                                    sort_keys=True).encode()).hexdigest()[:24]
    return Path(run_dir) / "_cache" / "rendered" / key
