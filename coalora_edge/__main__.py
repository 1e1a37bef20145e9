from coalora_edge.cli import main

main()
