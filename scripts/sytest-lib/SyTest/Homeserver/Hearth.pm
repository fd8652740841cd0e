# A Hearth started by SyTest (see SyTest::HomeserverFactory::Hearth).
use strict;
use warnings;

require SyTest::Homeserver::Manual;

package SyTest::Homeserver::Hearth;
use base qw( SyTest::Homeserver::Manual );

use Future;

sub start
{
   my $self = shift;

   my $command = $ENV{SYTEST_HEARTH_START}
      or return Future->fail( "SYTEST_HEARTH_START names no command to start Hearth with" );

   local $ENV{SYTEST_HEARTH_APPSERVICES} = join ":", @{ $self->{app_service_config_files} // [] };

   # It returns once Hearth answers through its TLS front; the processes stay behind it.
   system( $command ) == 0
      or return Future->fail( "$command failed (status $?)" );

   return Future->done;
}

1;
