"""Models: loading tokenizer and base (:mod:`.load`), the files a model dir must hold (:mod:`.files`), IA3
(:mod:`.ia3`), the token-sum loss (:mod:`.loss`), ZeRO-3 partitioned loading (:mod:`.zero3_load`) and what is
specific to one model family (:mod:`.families`, keyed by ``model_type``)."""
