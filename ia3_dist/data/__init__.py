"""Instruction data: records from files (:mod:`.records`), the prompt format (:mod:`.template`), tokenization and
its cache (:mod:`.tokenize`), the per-rank sampling plan (:mod:`.sampler`) and padding (:mod:`.collate`)."""
