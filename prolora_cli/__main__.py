from prolora_cli.cli import main

main()
