#!/usr/bin/env python3
"""Writes tests/fixtures/prompts.parquet with pyarrow (independent of Tandem's reader):
TRL-style prompt rows — a text prompt with an answer, a conversation whose last
assistant turn is the completion, a row without an answer.

    python tools/make_prompt_parquet.py
"""
import pyarrow as pa
import pyarrow.parquet as pq

message = pa.struct([("role", pa.string()), ("content", pa.string())])
table = pa.table(
    {
        "prompt": pa.array(["What is 2+2?", None, "Say hi."], pa.string()),
        "messages": pa.array(
            [
                None,
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                 {"role": "assistant", "content": "Paris"}],
                None,
            ],
            pa.list_(message),
        ),
        "answer": pa.array(["4", "Paris", None], pa.string()),
    }
)
pq.write_table(table, "tests/fixtures/prompts.parquet", compression="snappy")
print("wrote tests/fixtures/prompts.parquet")
