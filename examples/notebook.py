"""kiln from Python, as a notebook uses it: on the notebook's own Ray, train a digit classifier
and a character-level language model, label images, generate text and measure the model,
through kiln.api (the commands as functions, with the same options and checks).

    python examples/notebook.py [FOLDER]     # FOLDER: where the runs and outputs go
"""

import sys
import tempfile
from pathlib import Path

import ray

from kiln import api, embedded

# A notebook starts its Ray once; kiln's functions run their work there.
if not ray.is_initialized():
    ray.init(num_cpus=2)

work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kiln-notebook-"))
pngs, classes = embedded.digits(28)
digits = embedded.write_class_tar(work / "digits.tar", pngs[:600], classes[:600])
corpus = work / "corpus.txt"
corpus.write_text(embedded.stdlib_corpus(50_000))

cnn = api.train("cnn", data=str(digits), out=str(work / "digits-run"), max_steps=40,
                batch_size=64, workers=1)
print("digits:", cnn.best)
print("model card:", api.info(cnn.out)["spec"]["arch"])

labels = api.label(model=cnn.out, inputs=[str(digits)], output=str(work / "labels"), top_k=3)
print("labeled:", labels.summary["rows_written"], "rows")

scores = api.evaluate(model=cnn.out, data=str(digits), output=str(work / "eval"))
print("accuracy on its own training data:", scores.summary["eval"]["accuracy"])

lm = api.train("rnn", data=str(corpus), out=str(work / "chars-run"), max_steps=30,
               hidden=64, layers=1, seq_len=32, batch_size=16, workers=1)
print("chars:", lm.best)

texts = api.generate(model=lm.out, output=str(work / "samples"), num_samples=4,
                     max_chars=60, seed=1)
print("generated:", texts.summary["rows_written"], "samples")
