"""Shipping a model where people run it: GGUF files for llama.cpp, Ollama and LM Studio (the merged model,
or the adapter alone), with an Ollama Modelfile."""
