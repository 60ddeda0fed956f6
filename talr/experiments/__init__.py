"""The experiment commands: `talr sweep`, `talr report` and `talr cot` (dispatched by cli.py).

They sit above the library: they may import `talr.*`, but nothing in `talr/` outside this
package, nor `callbacks/`, may import them (tests/test_layout.py checks the direction). Their
module-level imports stay light (no torch, lightning or transformers), so each `--help` answers
at once; what needs those imports them inside the function that uses them.
"""
