# SyTest's `-I Hearth`: one Hearth that SyTest starts itself, so that it can be given what SyTest
# makes at run time: the application services' registration files, with tokens SyTest draws
# anew each run, and its mail server. Manual mode (`-I Manual`) tests a server that is already
# running, which cannot be given them.
#
# The options are Manual's (-L, --server-name): where the TLS front will listen. Starting Hearth
# and its TLS front is left to the command in SYTEST_HEARTH_START (scripts/sytest-lib/start-hearth),
# run with the settings in SYTEST_HEARTH_* variables.
use strict;
use warnings;

require SyTest::HomeserverFactory::Manual;
require SyTest::Homeserver::Hearth;

package SyTest::HomeserverFactory::Hearth;
use base qw( SyTest::HomeserverFactory::Manual );

sub implementation_name
{
   return "hearth";
}

sub create_server
{
   my $self = shift;

   # Manual's server with a `start` of its own: everything else (location, server name, one
   # server only, so that tests needing a second one are skipped) is Manual's.
   my $server = $self->SUPER::create_server( @_ );
   return bless $server, "SyTest::Homeserver::Hearth";
}

1;
