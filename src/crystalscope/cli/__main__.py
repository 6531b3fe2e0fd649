from crystalscope.cli import main

main()
