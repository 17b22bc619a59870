"""TRL SFTTrainer with the ExGra-Med alignment head (`python -m examples.trl_sft.train`)."""
