# The seed's first quick start: a Flask app whose code sits in OSS (oss://examplebucket/code/app.py),
# mounted at /mnt/data/ by berth boot, with flask pip-installed by the prepare phase.
import os

from flask import Flask

app = Flask(__name__)


@app.get("/hello")
def hello() -> str:
    return "Hello World"


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
