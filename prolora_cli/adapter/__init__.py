"""An adapter, whatever its method: its config, its folder, its layers put into a model, its PEFT form,
its parameter budget and what `inspect` says about it."""
