"""Task `instruction`: a conversation in, the assistant's answer out; supervised fine-tuning of a causal language
model on chat data (`task.type: instruction`).

Rows: a `messages` list of {role, content} (OpenAI, ShareGPT: keys and role names in clean.message_keys and
clean.roles), or prompt/response columns with an optional system column (alpaca: instruction, input, output, the
input joined to the instruction by clean.input_join); see sft_pipeline/chat.py. clean keeps code, markup and
newlines (HTML stripping and whitespace collapsing are options, off by default) and collapses exact duplicate
conversations; validate rejects unknown roles, a wrong turn order (an optional system message, then user and
assistant in turn, ending with the assistant), empty turns and conversations out of the length limits, and counts
prompts that appear with different answers (allowed); split keys on the first user turn; tokenize renders each
conversation with the chat template and trains only the assistant turns and their end tokens (labels -100
elsewhere), truncating or dropping rows over max_length by tokenize.truncation; train builds
`AutoModelForCausalLM`; evaluate measures loss and perplexity on the answer tokens, greedily generates an answer
for each test prompt and scores it (ROUGE-L, chrF, exact match; accuracy, macro-F1 and a confusion matrix when the
answers are a small set of strings), all for the base model too; the served model takes messages or a prompt and
answers with the chat template applied.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from sft_pipeline import chat
from sft_pipeline import params as common
from sft_pipeline.data.readers import Field as ReadField
from sft_pipeline.data.validation import rejected_rows
from sft_pipeline.io import StageError
from sft_pipeline.tasks.base import describe, Encoded, Evaluation, InputError, scalar, Task

CLEAN_COLUMNS = ["source_file", "line", "id", "messages", "prompt", "text_raw", "problem", "detail"]
VALIDATED_COLUMNS = ["messages", "prompt", "source_file", "line", "id", "turns"]
# Scores of a generated answer against the reference; `classification_like` adds accuracy and macro_f1.
ANSWER_SCORES = ("rouge_l", "chrf", "exact_match")
LABEL_SCORES = ("accuracy", "macro_f1")
# At most this many distinct reference answers, each seen twice on average, make the test split "a classification
# phrased as instructions", scored as one too.
MAX_LABELS = 20
OTHER = "(other)"
DEFAULT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


# ------------------------------------------------------------------------------------------------ params


class Columns(common.Section):
    """Column (or JSON key) names. A record is a conversation (`messages`) or prompt/response columns; `input`
    (alpaca) and `system` are optional; `id` is optional for every record."""

    messages: str = "messages"
    prompt: str = "prompt"
    input: str = "input"
    response: str = "response"
    system: str = "system"
    id: str = "id"


class MessageKeys(common.Section):
    """Keys of one message: OpenAI role/content, ShareGPT from/value."""

    role: str = "role"
    content: str = "content"


class Clean(common.Clean):
    columns: Columns = Columns()
    message_keys: MessageKeys = MessageKeys()
    # A file's role name (case-insensitive) -> ours. Roles not listed are rejected by validate, with their name.
    roles: dict[str, Literal["system", "user", "assistant"]] = DEFAULT_ROLES
    # alpaca: the user turn is the instruction, then this, then the input (when the input is not empty).
    input_join: str = "\n\n"
    # Off by default: code, markup and line breaks in answers are what the model must learn to write.
    strip_html: bool = False
    collapse_whitespace: bool = False


class Validate(common.Validate):
    # Over the whole conversation (every turn's characters).
    min_chars: int = Field(2, ge=1)
    max_chars: int = Field(50_000, ge=1)
    min_rows: int = Field(10, ge=3)


class Tokenize(common.Tokenize):
    max_length: int = Field(512, ge=8)
    # A row longer than max_length: drop it (reported), or truncate it (the tokens after max_length are lost; a
    # row left with no answer token is dropped). drop by default: a cut answer teaches the model to stop mid-way.
    truncation: Literal["drop", "truncate"] = "drop"
    # null: the model's own template; or a name (zephyr, chatml; sft_pipeline/chat.py) or a Jinja file.
    chat_template: str | None = None


class Train(common.Train):
    # Padding-free packing: each batch's rows concatenated into one sequence, position ids restarting per row, so
    # that no row attends to another (exact); no padding is computed.
    packing: bool = False
    epochs: float = Field(1, gt=0)
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _packing_and_soft_prompts(self) -> "Train":
        if self.packing and self.strategy == "prompt_tuning":
            raise ValueError("train.packing: peft ignores position ids under prompt_tuning, so packed rows would "
                             "attend to each other; set train.packing: false for prompt_tuning")
        if self.strategy == "freeze" and self.options().trainable_layers == 0:
            raise ValueError("train.freeze.trainable_layers: a causal language model gets no new head, so freeze "
                             "with no trainable block trains nothing; set it to 1 or more")
        return self


class Evaluate(common.Evaluate):
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    # Test rows answered by generation (the first ones of the split, which is in hash order); null: all. Loss and
    # perplexity always cover every test row.
    max_rows: int | None = Field(100, ge=1)
    # The base model answers the same prompts and gets the same metrics, in the same run.
    compare_base: bool = True


class Mlflow(common.Mlflow):
    registered_model: str = "sft-assistant"
    promotion_metric: str = "test_rouge_l"


class TaskSection(common.Task):
    type: Literal["instruction"] = "instruction"


class Params(common.Params):
    task: TaskSection = TaskSection()
    clean: Clean = Clean()
    validate_: Validate = Field(Validate(), alias="validate")
    tokenize: Tokenize = Tokenize()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    mlflow: Mlflow = Mlflow()

    @model_validator(mode="after")
    def _promotion_metric_is_logged(self) -> "Params":
        allowed = promotion_metrics()
        if self.mlflow.promotion_metric not in allowed:
            raise ValueError(f"mlflow.promotion_metric: {self.mlflow.promotion_metric!r} cannot gate task "
                             f"instruction (the gate needs a metric where higher is better); choose one of "
                             f"{', '.join(sorted(allowed))}")
        return self


def promotion_metrics() -> set[str]:
    # Not gain_*: the gate scores the champion on the same prompts (tracking.py), and against one base model a
    # gain differs from the test score by a constant, while against another base it compares unlike things.
    return {f"test_{s}" for s in ANSWER_SCORES + LABEL_SCORES}


# ------------------------------------------------------------------------------------------------ the task


class Instruction(Task):
    name = "instruction"
    params = Params
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    best_metric = "loss"
    greater_is_better = False
    new_head = False
    compute_metrics = None
    clean_modules = ("sft_pipeline.chat",)

    # clean

    def fields(self, options: Clean) -> list[ReadField]:
        c = options.columns
        return [ReadField("id", c.id), ReadField("messages", c.messages, structured=True),
                ReadField("prompt", c.prompt), ReadField("input", c.input), ReadField("response", c.response),
                ReadField("system", c.system)]

    def normalize(self, records: pd.DataFrame, options: Clean) -> pd.DataFrame:
        c = options.columns
        has_messages = records["messages"].notna()
        if len(records) and not has_messages.any() and records["prompt"].isna().all() \
                and records["response"].isna().all():
            name = records["source_file"].iloc[0]
            raise StageError(f"{name}: no {c.messages!r} and no {c.prompt!r}/{c.response!r} values in any record; "
                             f"set clean.columns (messages, or prompt and response) to the file's names")
        conversations, problems, details, raw = [], [], [], []
        keys = options.message_keys
        for record in records.itertuples(index=False):
            messages_value = _value(record.messages)
            if messages_value is not None:
                raw.append(messages_value)
            else:
                given = {k: _value(getattr(record, k)) for k in ("system", "prompt", "input", "response")}
                raw.append(json.dumps({k: v for k, v in given.items() if v is not None}, ensure_ascii=False))
            try:
                if messages_value is not None:
                    messages = chat.parse_messages(messages_value, keys.role, keys.content, options.roles)
                else:
                    messages = chat.from_columns(given["prompt"], given["response"], given["system"],
                                                 given["input"], options.input_join)
                messages = [{"role": m["role"], "content": normalize_turn(m["content"], options)}
                            for m in messages]
                conversations.append(json.dumps(messages, ensure_ascii=False))
                problems.append(None)
                details.append(None)
            except chat.ConversationError as exc:
                conversations.append(None)
                problems.append(exc.reason)
                details.append(str(exc))
        out = records[["source_file", "line", "id"]].copy()
        out["messages"] = pd.array(conversations, dtype="string")
        out["prompt"] = pd.array([None if m is None else chat.first_user_turn(json.loads(m)) for m in conversations],
                                 dtype="string")
        out["text_raw"] = pd.array(raw, dtype="string")
        out["problem"] = pd.array(problems, dtype="string")
        out["detail"] = pd.array(details, dtype="string")
        return out[CLEAN_COLUMNS]

    def duplicate_key(self, rows: pd.DataFrame):
        return rows[["messages"]], rows["problem"].isna()

    # validate

    def validate(self, rows: pd.DataFrame, options: Validate):
        reasons, details, turns = [], [], []
        for row in rows.itertuples(index=False):
            if row.problem is not None and row.problem is not pd.NA:
                reasons.append(row.problem)
                details.append(row.detail)
                turns.append(0)
                continue
            messages = json.loads(row.messages)
            turns.append(len(messages))
            found = chat.problems(messages)
            chars = sum(len(m["content"]) for m in messages)
            if found is None and chars < options.min_chars:
                found = ("too_short", f"{chars} characters in all turns, fewer than validate.min_chars = "
                                      f"{options.min_chars}")
            if found is None and chars > options.max_chars:
                found = ("too_long", f"{chars} characters in all turns, more than validate.max_chars = "
                                     f"{options.max_chars}")
            reasons.append(None if found is None else found[0])
            details.append(None if found is None else found[1])
        reason = pd.Series(reasons, index=rows.index, dtype="object")
        failed = reason.notna()
        rejected = rejected_rows(rows[failed], "", "")
        rejected["reason"] = reason[failed].to_numpy()
        rejected["detail"] = pd.Series(details, index=rows.index)[failed].to_numpy()
        kept = rows[~failed].assign(turns=np.asarray(turns, dtype=np.int64)[~failed.to_numpy()])
        report = conversation_report(kept)
        return kept[VALIDATED_COLUMNS], rejected, report

    def problems(self, kept: pd.DataFrame, options: Validate) -> list[str]:
        if len(kept) < options.min_rows:
            return [f"{len(kept)} conversations passed validation, fewer than validate.min_rows = "
                    f"{options.min_rows}: too few for a train, validation and test split"]
        return []

    def summary_lines(self, report: dict) -> list[str]:
        c = report["conversations"]
        d = report["duplicate_prompts"]
        return ["", f"Conversations: {c['rows']} ({c['multi_turn']} multi-turn, {c['with_system']} with a system "
                    f"message); assistant turns {c['assistant_turns']}; turns per conversation mean {c['turns_mean']}, "
                    f"max {c['turns_max']}.",
                f"Prompts asked more than once with different answers: {d['prompts']} ({d['rows']} rows; allowed, "
                f"the model sees every answer)."] + placeholder_lines(report)

    def warnings(self, report: dict) -> list[str]:
        return [line.removeprefix("**Warning**: ") for line in placeholder_lines(report)]

    # split

    def split_key(self, rows: pd.DataFrame) -> pd.Series:
        return rows["prompt"]

    # tokenize

    def texts(self, rows: pd.DataFrame) -> list[str]:
        return ["\n".join(str(m.get("content") or "") for m in json.loads(messages)) for messages in rows["messages"]]

    def prepare_tokenizer(self, tokenizer, options: Tokenize):
        chat.resolve_template(tokenizer, options.chat_template)
        return tokenizer

    def encode(self, splits, tokenizer, options: Tokenize, cache) -> Encoded:
        from sft_pipeline.encoding import length_stats

        special = chat.special_ids(tokenizer)
        datasets, stats, ends = {}, {}, set()
        for name, frame in splits.items():
            conversations = [json.loads(m) for m in frame["messages"]]
            try:
                rendered = [chat.answer_spans(tokenizer, m) for m in conversations]
            except chat.TemplateError as exc:
                raise StageError(f"tokenize: {exc}") from None
            texts = [text for text, _ in rendered]
            encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts \
                else {"input_ids": [], "offset_mapping": []}
            columns = {"input_ids": [], "labels": [], "row": []}
            full, trained, total, dropped, truncated = [], 0, 0, [], 0
            for row, ((_, spans), ids, offsets) in enumerate(zip(rendered, encodings["input_ids"],
                                                                  encodings["offset_mapping"])):
                try:
                    mask, found = chat.trained_mask(offsets, ids, spans, special)
                except chat.TemplateError as exc:
                    raise StageError(f"tokenize: {exc}") from None
                ends |= found
                labels = [t if m else -100 for t, m in zip(ids, mask)]
                full.append(len(ids))
                if len(ids) > options.max_length:
                    if options.truncation == "drop":
                        dropped.append(_row_ref(frame, row, "longer than max_length"))
                        continue
                    ids, labels = ids[:options.max_length], labels[:options.max_length]
                    if all(x == -100 for x in labels):
                        dropped.append(_row_ref(frame, row, "no answer token left after truncation"))
                        continue
                    truncated += 1
                columns["input_ids"].append(ids)
                columns["labels"].append(labels)
                columns["row"].append(row)
                trained += sum(x != -100 for x in labels)
                total += len(ids)
            datasets[name] = chat_dataset(columns, salt=[name, options.max_length, options.truncation])
            lengths = np.asarray(full, dtype=np.int64)
            stats[name] = {
                **length_stats(lengths, options.max_length),
                "rows_kept": len(columns["row"]),
                "rows_dropped": len(dropped),
                "rows_truncated": truncated,
                "tokens": total,
                "answer_tokens": trained,
                "trained_token_fraction": round(trained / total, 4) if total else 0.0,
                "dropped_first": dropped[:20],
            }
        if not len(datasets.get("train", [])):
            raise StageError(f"tokenize: no training row is left at tokenize.max_length = {options.max_length} "
                             f"(truncation: {options.truncation}); raise max_length")
        meta = {"end_token_ids": sorted(int(i) for i in ends), "max_length": options.max_length,
                "truncation": options.truncation,
                "chat_template": options.chat_template}
        report = {"truncation": options.truncation, "chat_template": options.chat_template or "the model's own",
                  "end_tokens": [tokenizer.convert_ids_to_tokens(int(i)) for i in sorted(ends)], "splits": stats}
        return Encoded(datasets, meta, report, texts_encoded=sum(len(f) for f in splits.values()))

    # train

    def model_kwargs(self, meta: dict, tokenizer) -> dict:
        return {"pad_token_id": tokenizer.pad_token_id}

    def collator(self, tokenizer, device: str, options: Train | None = None):
        return ChatCollator(tokenizer.pad_token_id, packing=bool(options and getattr(options, "packing", False)),
                            pad_to_multiple_of=8 if device == "cuda" else None)

    # evaluate

    def evaluate(self, model, tokenizer, test, rows, meta, options: Evaluate, device: str, base=None) -> Evaluation:
        conversations = [json.loads(m) for m in rows["messages"]]
        contexts = [chat.context_of(m) for m in conversations]
        references = [m[-1]["content"] for m in conversations]
        limit = len(rows) if options.max_rows is None else min(options.max_rows, len(rows))
        stops = sorted(set(meta.get("end_token_ids", [])) | set(chat.stop_ids(tokenizer)))
        max_length = int(meta.get("max_length") or getattr(tokenizer, "model_max_length", 2048) or 2048)
        models = {"tuned": model}
        if options.compare_base and base is not None:
            models["base"] = base()
        results, answers = {}, {}
        for who, m in models.items():
            loss = answer_loss(m, test, tokenizer.pad_token_id, options.batch_size, device)
            answers[who] = generate(m, tokenizer, contexts[:limit], options.batch_size, options.max_new_tokens,
                                    stops, device, max_prompt_tokens=max_length)
            results[who] = {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3),
                            **answer_scores(answers[who], references[:limit])}
        labels = label_set(references)
        predicted = None
        if labels is not None:
            predicted = {who: [as_label(a, labels) for a in answers[who]] for who in models}
            from sft_pipeline.tasks.classification import classification_summary

            actual = [as_label(r, labels) for r in references[:limit]]
            summaries = {who: classification_summary(actual, predicted[who], labels) for who in models}
            for who in models:
                s = summaries[who]["metrics"]
                results[who].update({"accuracy": s["accuracy"], "macro_f1": s["macro"]["f1"]})
        metrics = {"test_rows": len(rows), "loss_rows": len(test), "generated_rows": limit,
                   "classification_like": labels is not None, **results}
        if "base" in results:
            metrics["gain"] = {k: round(results["tuned"][k] - results["base"][k], 4) for k in results["tuned"]}
        table = pd.DataFrame({
            "id": rows["id"].iloc[:limit].to_numpy(), "source": [f"{f}:{n}" for f, n in
                                                                 zip(rows["source_file"].iloc[:limit],
                                                                     rows["line"].iloc[:limit])],
            "prompt": [ctx[-1]["content"] if ctx else "" for ctx in contexts[:limit]],
            "reference": references[:limit],
            "base_answer": answers.get("base", [None] * limit),
            "tuned_answer": answers["tuned"],
        })
        predictions = table.assign(
            exact_match=[normalize_answer(a) == normalize_answer(r) for a, r in zip(answers["tuned"],
                                                                                    references[:limit])])
        if predicted is not None:
            predictions["actual"], predictions["predicted"] = actual, predicted["tuned"]
        else:  # the DVC confusion plot over free text: exact matches against the rest
            predictions["actual"] = "reference"
            predictions["predicted"] = np.where(predictions["exact_match"], "exact match", "different")
        figures = {}
        if predicted is not None:
            from sft_pipeline.tasks.classification import confusion_image

            shown = labels + ([OTHER] if OTHER in predicted["tuned"] else [])
            figures["confusion_matrix.png"] = lambda path: confusion_image(actual, predicted["tuned"], shown, path)
        flat = {}
        for who, prefix in (("tuned", "test_"), ("base", "base_test_")):
            flat.update({f"{prefix}{k}": float(v) for k, v in results.get(who, {}).items()})
        flat.update({f"gain_{k}": float(v) for k, v in metrics.get("gain", {}).items()})
        details = {"metrics": metrics, "stop_token_ids": stops,
                   "labels": labels, "examples": table.head(20).to_dict(orient="records")}
        if predicted is not None:
            details["confusion_matrix"] = summaries["tuned"]["confusion_matrix"]
        t = results["tuned"]
        summary = (f"test loss {t['loss']} (perplexity {t['perplexity']}), ROUGE-L {t['rouge_l']}, chrF {t['chrf']}, "
                   f"exact match {t['exact_match']} on {limit} generated answers")
        if "base" in results:
            b = results["base"]
            summary += f"; base model: loss {b['loss']}, ROUGE-L {b['rouge_l']}, chrF {b['chrf']}"
        return Evaluation(metrics=metrics, details=details, predictions=predictions, mlflow_metrics=flat,
                          figures=figures, summary=summary, tables={"generations.json": table},
                          answers=pd.DataFrame({"answer": answers["tuned"]}))

    def metrics_lines(self, metrics: dict) -> list[str]:
        names = ["loss", "perplexity", *ANSWER_SCORES] + (list(LABEL_SCORES) if metrics.get("classification_like")
                                                         else [])
        who = [w for w in ("base", "tuned") if w in metrics]
        lines = [f"Test set: {metrics['test_rows']} conversations, {metrics['generated_rows']} answered by "
                 f"generation", f"  {'metric':<12}" + "".join(f"{w:>12}" for w in who)
                 + (f"{'gain':>12}" if "gain" in metrics else "")]
        for name in names:
            lines.append(f"  {name:<12}" + "".join(f"{metrics[w][name]:>12}" for w in who)
                         + (f"{metrics['gain'][name]:>+12.4f}" if "gain" in metrics else ""))
        return lines

    def metric_names(self, params) -> set[str]:
        scores = ("loss", "perplexity", *ANSWER_SCORES, *LABEL_SCORES)
        return {f"{prefix}{s}" for prefix in ("test_", "base_test_", "gain_") for s in scores}

    # promotion gate

    def gate_input(self, rows: pd.DataFrame, options: Evaluate) -> pd.DataFrame:
        """The prompts evaluate generates answers for: the first evaluate.max_rows test conversations, each without
        its last answer."""
        limit = len(rows) if options.max_rows is None else min(options.max_rows, len(rows))
        return pd.DataFrame({"messages": [chat.context_of(json.loads(m)) for m in rows["messages"].iloc[:limit]]})

    def gate_outputs(self, answers: pd.DataFrame, rows: pd.DataFrame, meta: dict) -> pd.DataFrame:
        """Per answer: ROUGE-L F1, exact match and chrF's n-gram statistics against the reference (chrF is a corpus
        score, so a resample sums the statistics of its rows), and, when the test split's answers are a small set,
        the reference's and the answer's label, as evaluate scores them."""
        from sacrebleu.metrics import CHRF

        references = [json.loads(m)[-1]["content"] for m in rows["messages"]]
        given = [str(a) for a in answers["answer"].fillna("")]
        compared = references[:len(given)]
        scorer = rouge_l_scorer()
        out = pd.DataFrame({
            "rouge_l": [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(given, compared)],
            "exact_match": [float(normalize_answer(a) == normalize_answer(r)) for a, r in zip(given, compared)],
            "chrf_stats": list(np.asarray(CHRF()._extract_corpus_statistics(given, [compared]), dtype=np.float64)
                               .reshape(len(given), -1)),
        })
        labels = label_set(references)  # from every test row, as evaluate decides it
        if labels is not None:
            from sft_pipeline.tasks.classification import of_labels

            out["actual"] = of_labels([as_label(r, labels) for r in compared], labels)
            out["predicted"] = of_labels([as_label(a, labels) for a in given], labels)  # (other): an error
        return out

    def gate_scores(self, outputs: pd.DataFrame, weights) -> dict[str, np.ndarray]:
        from sacrebleu.metrics import CHRF

        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        total = np.maximum(weights.sum(axis=1), 1)
        chrf = CHRF()
        stats = weights @ np.vstack(outputs["chrf_stats"].to_numpy()) if len(outputs) else \
            np.zeros((len(weights), 3 * (chrf.char_order + chrf.word_order)))
        scores = {"rouge_l": weights @ outputs["rouge_l"].to_numpy(np.float64) / total,
                  "exact_match": weights @ outputs["exact_match"].to_numpy(np.float64) / total,
                  "chrf": np.array([chrf._compute_f_score(row) for row in stats])}
        if "actual" in outputs:
            from sft_pipeline.tasks.classification import resampled_label_metrics

            m = resampled_label_metrics(outputs["actual"], outputs["predicted"], weights)
            scores.update(accuracy=m["accuracy"], macro_f1=m["macro"]["f1"])
        return {f"test_{name}": values for name, values in scores.items()}

    # serving

    def serving_config(self, params) -> dict:
        return {"max_length": params.tokenize.max_length, "batch_size": params.evaluate.batch_size,
                "max_new_tokens": params.evaluate.max_new_tokens,
                "strip_html": params.clean.strip_html, "collapse_whitespace": params.clean.collapse_whitespace}

    def signature(self):
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        # No input schema: MLflow would check it before predict and drop what it does not declare, so that records
        # without `messages` or `prompt` reached predict as no rows at all (an empty 200), and one request could not
        # mix messages and prompts. predict checks the input itself (model_conversations) and names the row.
        return ModelSignature(inputs=None, outputs=Schema([ColSpec("string", "answer")]))

    def predict(self, model, tokenizer, model_input, config: dict) -> pd.DataFrame:
        """Each conversation (or prompt) gets the chat template and the training data's cleaning; the answer is the
        greedy continuation up to the end-of-turn token, at most max_new_tokens."""
        options = Clean(strip_html=bool(config.get("strip_html", False)),
                        collapse_whitespace=bool(config.get("collapse_whitespace", False)))
        conversations = model_conversations(model_input, options)
        answers = generate(model, tokenizer, conversations, int(config.get("batch_size", 8)),
                           int(config.get("max_new_tokens", 64)), chat.stop_ids(tokenizer), str(model.device),
                           max_prompt_tokens=int(config.get("max_length", 2048)))
        return pd.DataFrame({"answer": pd.Series(answers, dtype=object)})


# ------------------------------------------------------------------------------------------------ helpers


def _value(value):
    return None if value is None or value is pd.NA else value


def _row_ref(frame: pd.DataFrame, row: int, why: str) -> dict:
    r = frame.iloc[row]
    return {"id": None if pd.isna(r["id"]) else str(r["id"]), "source": f"{r['source_file']}:{r['line']}",
            "why": why}


def normalize_turn(text: str, options: Clean) -> str:
    """A turn as clean keeps it: line endings as \\n, control characters other than tab and newline removed, outer
    whitespace trimmed; HTML stripping and whitespace collapsing only when asked."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    text = text.replace("\ufeff", "").replace("\u200b", "")
    if options.strip_html:
        from sft_pipeline.data.text import strip_html

        text = strip_html(text)
    if options.collapse_whitespace:
        text = " ".join(text.split())
    return text.strip()


def placeholder_lines(report: dict) -> list[str]:
    p = report["template_placeholders"]
    if not p["rows"]:
        return []
    names = ", ".join("{{" + name + "}}" for name in p["names"])
    return [f"**Warning**: {p['rows']} conversations hold template placeholders ({names}); they train as written. "
            f"Fill them in before training if they are meant to be replaced."]


def conversation_report(kept: pd.DataFrame) -> dict:
    conversations = [json.loads(m) for m in kept["messages"]]
    turns = [len(c) for c in conversations]
    contexts = Counter()
    answers: dict[str, set] = {}
    for c in conversations:
        key = json.dumps(chat.context_of(c), ensure_ascii=False)
        contexts[key] += 1
        answers.setdefault(key, set()).add(c[-1]["content"])
    several = [k for k, a in answers.items() if len(a) > 1]
    placeholders = Counter()
    placeholder_rows = 0
    for c in conversations:
        found = {name for m in c for name in _PLACEHOLDER.findall(m["content"])}
        placeholder_rows += bool(found)
        placeholders.update(found)
    examples = sorted(several, key=lambda k: -len(answers[k]))[:10]
    return {
        "conversations": {
            "rows": len(conversations),
            "multi_turn": sum(sum(m["role"] == "assistant" for m in c) > 1 for c in conversations),
            "with_system": sum(c[0]["role"] == "system" for c in conversations) if conversations else 0,
            "assistant_turns": sum(sum(m["role"] == "assistant" for m in c) for c in conversations),
            "turns_mean": round(float(np.mean(turns)), 2) if turns else 0.0,
            "turns_max": max(turns, default=0),
        },
        # Template placeholders such as {{name}} (LLaMA-Factory's identity data) are meant to be filled in before
        # training; they train as written, so they are counted and named here.
        "template_placeholders": {"rows": placeholder_rows, "names": dict(placeholders.most_common(20))},
        "duplicate_prompts": {
            "prompts": len(several),
            "rows": sum(contexts[k] for k in several),
            "examples": [{"prompt": json.loads(k)[-1]["content"] if json.loads(k) else "",
                          "answers": len(answers[k])} for k in examples],
        },
    }


def chat_dataset(columns: dict, salt):
    """input_ids, labels (int32; -100 = no loss), row (the row of the split's Parquet file) and length, with a
    fingerprint from the content (the same rows give a byte-identical folder)."""
    import hashlib

    import pyarrow as pa
    from datasets import Dataset, DatasetInfo, Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                         "row": Value("int32"), "length": Value("int32")})
    lengths = [len(x) for x in columns["input_ids"]]
    table = pa.table({"input_ids": pa.array(columns["input_ids"], pa.list_(pa.int32())),
                      "labels": pa.array(columns["labels"], pa.list_(pa.int32())),
                      "row": pa.array(columns["row"], pa.int32()), "length": pa.array(lengths, pa.int32())})
    digest = hashlib.blake2b(json.dumps(salt).encode(), digest_size=8)
    for name in ("input_ids", "labels"):
        digest.update(np.ascontiguousarray(table.column(name).combine_chunks().flatten().to_numpy(
            zero_copy_only=False)).tobytes())
    digest.update(np.asarray(lengths, dtype=np.int32).tobytes())
    digest.update(np.asarray(columns["row"], dtype=np.int32).tobytes())
    return Dataset(table.cast(features.arrow_schema), info=DatasetInfo(features=features),
                   fingerprint=digest.hexdigest())


class ChatCollator:
    """Rows (input_ids, labels) into a batch. Padded: right-padded to the longest row, labels padded with -100, an
    attention mask. Packed (`packing`): transformers' DataCollatorWithFlattening, one sequence of all rows with
    position ids restarting per row and the first label of each row masked, so no row predicts from another; no
    padding at all. Either way the batch asks the model for no KV cache (`use_cache=False`), which packing needs to
    keep rows apart and which training never uses."""

    def __init__(self, pad_id: int, packing: bool = False, pad_to_multiple_of: int | None = None):
        self.pad_id, self.packing, self.multiple = pad_id, packing, pad_to_multiple_of
        self._flatten = None

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        if self.packing:
            if self._flatten is None:
                from transformers import DataCollatorWithFlattening

                self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
            batch = self._flatten([{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows])
            return {**batch, "use_cache": False}
        longest = max(len(r["input_ids"]) for r in rows)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "use_cache": False}


def answer_loss(model, dataset, pad_id: int, batch_size: int, device: str) -> float:
    """Mean cross-entropy per answer token (labels != -100) over the dataset: every token weighs the same,
    whatever its row's length."""
    import torch

    collate = ChatCollator(pad_id)
    total, count = 0.0, 0
    order = np.argsort([len(x) for x in dataset["input_ids"]], kind="stable")
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collate([dataset[int(i)] for i in order[start:start + batch_size]])
            batch.pop("use_cache")
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits.float()
            shifted = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       shifted.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(losses)
            count += int((shifted != -100).sum())
    return total / count if count else float("nan")


def generate(model, tokenizer, conversations: list[list[dict]], batch_size: int, max_new_tokens: int,
             stops: list[int], device: str, max_prompt_tokens: int = 2048) -> list[str]:
    """Greedy answers to each conversation (its last turn is the user's), batched by prompt length with left
    padding; a prompt longer than `max_prompt_tokens` keeps its last tokens."""
    import torch

    prompts = [chat.render(tokenizer, c, add_generation_prompt=True) for c in conversations]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]
    order = np.argsort([len(x) for x in encoded], kind="stable")
    answers: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = [int(i) for i in order[start:start + batch_size]]
            longest = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, i in enumerate(chunk):
                n = len(encoded[i])
                ids[row, longest - n:] = torch.as_tensor(encoded[i])
                mask[row, longest - n:] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                 use_cache=True, temperature=None, top_p=None, top_k=None)
            for row, i in enumerate(chunk):
                new = out[row, longest:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    return answers


_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_PUNCT = re.compile(r"[\W_]+", re.UNICODE)
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")


def normalize_answer(text: str) -> str:
    """For exact match: NFKC, case folded, punctuation and whitespace removed."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).casefold())


class WordTokenizer:
    """ROUGE tokens: lowercased words and numbers in any script, each CJK character a token of its own.
    rouge-score's default keeps ASCII letters and digits only, which scores Chinese answers 0."""

    def tokenize(self, text: str) -> list[str]:
        text = _CJK.sub(r" \1 ", unicodedata.normalize("NFKC", text).casefold())
        return [t for t in _PUNCT.split(text) if t]


def rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=WordTokenizer())


def answer_scores(answers: list[str], references: list[str]) -> dict:
    """ROUGE-L F1 (mean over rows, rouge-score), chrF (corpus level, sacrebleu, 0-100) and exact match."""
    if not answers:
        return {"rouge_l": 0.0, "chrf": 0.0, "exact_match": 0.0}
    from sacrebleu.metrics import CHRF

    scorer = rouge_l_scorer()
    rouge = float(np.mean([scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)]))
    chrf = CHRF().corpus_score(answers, [references]).score
    exact = float(np.mean([normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, references)]))
    return {"rouge_l": round(rouge, 4), "chrf": round(float(chrf), 2), "exact_match": round(exact, 4)}


def label_set(references: list[str]) -> list[str] | None:
    """The distinct reference answers when they are a small set (each seen twice on average), else None."""
    forms: dict[str, str] = {}
    for r in references:
        forms.setdefault(normalize_answer(r), r)
    if 2 <= len(forms) <= MAX_LABELS and 2 * len(forms) <= len(references):
        return sorted(forms.values())
    return None


def as_label(answer: str, labels: list[str]) -> str:
    """The label an answer names (after normalisation), or (other)."""
    key = normalize_answer(answer)
    return next((label for label in labels if normalize_answer(label) == key), OTHER)


EXPECTED_INPUT = ('Send prompts or conversations: {"inputs": ["a prompt", ...]}, {"dataframe_records": '
                  '[{"prompt": "...", "system": "..."}]} or {"dataframe_records": [{"messages": [{"role": "user", '
                  '"content": "..."}]}]}; an empty list gets an empty answer.')


def conversations_of(model_input) -> list[list[dict]]:
    """What the served model accepts: a prompt, a list of prompts, a conversation, a list of conversations, a dict
    or DataFrame with `messages` (lists, or JSON text) or `prompt` (and optionally `system`); one conversation per
    row, in order. A row with neither, or with a field of the wrong kind, is an InputError naming the row."""
    rows = _chat_rows(model_input)
    out, problems = [], []
    for i, row in enumerate(rows):
        try:
            out.append(_row_conversation(row))
        except ValueError as exc:
            problems.append((i, str(exc)))
    if problems:
        raise InputError.of_rows(problems, len(rows), EXPECTED_INPUT)
    return out


def model_conversations(model_input, options: Clean) -> list[list[dict]]:
    """conversations_of with every turn cleaned as clean keeps it; a last user message that cleaning leaves empty
    is an InputError too (the model would answer nothing in particular)."""
    conversations = [[{"role": m["role"], "content": normalize_turn(m["content"], options)} for m in c]
                     for c in conversations_of(model_input)]
    problems = [(i, "the last user message is empty after cleaning") for i, c in enumerate(conversations)
                if not c[-1]["content"]]
    if problems:
        raise InputError.of_rows(problems, len(conversations), EXPECTED_INPUT)
    return conversations


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _chat_rows(model_input) -> list:
    """The rows of the input: each a prompt (str), a conversation (list of turns) or a record (dict)."""
    model_input = scalar(model_input)
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        model_input = {k: scalar(v) for k, v in model_input.items()}
        prompts = model_input.get("prompt")
        if "messages" not in model_input and isinstance(prompts, (list, tuple, np.ndarray)):
            # {"inputs": {"prompt": [...], "system": "..."}}: columns, one prompt a row
            return [{**model_input, "prompt": scalar(p)} for p in prompts]
        model_input = pd.DataFrame([model_input])
    if isinstance(model_input, pd.Series):
        model_input = model_input.tolist()
    if isinstance(model_input, pd.DataFrame):
        if not len(model_input):
            return []
        if not {"messages", "prompt"} & set(model_input.columns):
            fields = ", ".join(f"`{c}`" for c in model_input.columns)
            raise InputError(f"each row needs `messages` (a list of {{role, content}}) or `prompt` (a string); the "
                             f"records have {fields}. {EXPECTED_INPUT}")
        return model_input.to_dict(orient="records")
    if isinstance(model_input, (list, tuple, np.ndarray)):
        items = [scalar(x) for x in model_input]
        if items and all(isinstance(x, dict) and "role" in x for x in items):
            return [items]  # one conversation
        return items
    raise InputError(f"expected prompts or conversations, got {describe(model_input)}. {EXPECTED_INPUT}")


def _row_conversation(row) -> list[dict]:
    if isinstance(row, str):
        return [{"role": "user", "content": str(row)}]
    if isinstance(row, (list, tuple, np.ndarray)):
        return _conversation(row)
    if not isinstance(row, dict):
        raise ValueError(f"expected a prompt, a conversation or a record, got {describe(row)}")
    messages, prompt, system = (scalar(row.get(k)) for k in ("messages", "prompt", "system"))
    if not _missing(messages):
        return _conversation(messages)
    if _missing(prompt):
        fields = ", ".join(f"`{k}`" for k, v in row.items() if not _missing(v)) or "no fields"
        raise ValueError(f"needs `messages` (a list of {{role, content}}) or `prompt` (a string); it has {fields}")
    if not isinstance(prompt, str):
        raise ValueError(f"`prompt` is {describe(prompt)}")
    if not _missing(system) and not isinstance(system, str):
        raise ValueError(f"`system` is {describe(system)}")
    return ([{"role": "system", "content": str(system)}] if isinstance(system, str) and system.strip() else []) \
        + [{"role": "user", "content": str(prompt)}]


def _conversation(messages) -> list[dict]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise ValueError("`messages` is a string that is not JSON; give a list of {role, content}") from None
    if not isinstance(messages, (list, tuple, np.ndarray)):
        raise ValueError(f"`messages` is {describe(messages)}; give a list of {{role, content}}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in chat.ROLES:
            raise ValueError(f"a message must be {{role: system|user|assistant, content: text}}, got {m!r}")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    if not out or out[-1]["role"] != "user":
        raise ValueError("a conversation to answer must end with a user message")
    return out
