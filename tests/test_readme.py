"""The README's drop-in snippet runs as written and moves particles onto the data."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_drop_in_snippet_runs_and_climbs_the_density():
    text = README.read_text()
    section = text[text.index("## Drop MSD into your own code"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    mixture, x = namespace["denoiser"].mixture, namespace["x"].detach()
    start = torch.rand(256, 2, generator=torch.Generator().manual_seed(7)) * 2.4 - 0.9
    assert float(mixture.log_prob(x).mean()) > float(mixture.log_prob(start).mean()) + 10
