"""Programs built on the library: the ``grace-peft`` command (:mod:`.cli`), the SmolLM2 demo (:mod:`.demo`, the
README's main job), and what they share: loading a base model by folder or name (:mod:`.base_models`) and
SmolLM2-135M-Instruct from the package index (:mod:`.smollm2`). The library never imports from here."""
