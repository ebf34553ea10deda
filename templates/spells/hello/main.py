"""The hello spell: reads {"name": ...} from SPELL_INPUT, writes SPELL_OUT/hello.txt."""

import json
import os
import pathlib

data = json.loads(pathlib.Path(os.environ["SPELL_INPUT"]).read_text(encoding="utf-8"))
print("::progress 50 writing the greeting", flush=True)
out = pathlib.Path(os.environ["SPELL_OUT"]) / "hello.txt"
out.write_text(f"Hello, {data['name']}!\n", encoding="utf-8")
print("::progress 100 done", flush=True)
